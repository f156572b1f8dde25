//! Numbers as people read them, the same on the console, the status page's terminal view and
//! the training plot.

/// A count with thousands grouped: 60,000.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds as "2d 3h", "3h 05m", "4m 09s" or "12s"; "unknown" for a negative or non-finite
/// value.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "unknown".to_owned();
    }
    let s = secs.round() as u64;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(60_000), "60,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn durations_read_from_days_to_seconds() {
        assert_eq!(duration(5.4), "5s");
        assert_eq!(duration(12.4), "12s");
        assert_eq!(duration(65.0), "1m 05s");
        assert_eq!(duration(249.0), "4m 09s");
        assert_eq!(duration(3723.0), "1h 02m");
        assert_eq!(duration(3.0 * 3600.0 + 5.0 * 60.0), "3h 05m");
        assert_eq!(duration(2.0 * 86_400.0 + 3.0 * 3600.0), "2d 3h");
        assert_eq!(duration(2.0 * 86_400.0 + 3.0 * 3600.0 + 59.0), "2d 3h");
        assert_eq!(duration(-3.0), "unknown");
        assert_eq!(duration(f64::NAN), "unknown");
    }
}
