//! Axis ranges and tick marks: "nice" steps of 1, 2 or 5 times a power of ten, and labels
//! with exactly the decimals those steps need, so ticks read 0.5 1.0 1.5, never 0.5 1 1.5
//! or 0.30000000000000004.

use std::ops::Range;

/// Tick positions on one axis and how many decimals their labels need.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Ticks {
    pub values: Vec<f64>,
    pub decimals: usize,
}

/// At most `max_ticks` (at least 2) evenly spaced ticks inside `range`. With `integers`, the
/// spacing is at least 1 (steps are whole numbers).
pub(super) fn ticks(range: &Range<f64>, max_ticks: usize, integers: bool) -> Ticks {
    let max_ticks = max_ticks.max(2);
    let span = range.end - range.start;
    if !(span.is_finite() && span > 0.0) {
        return Ticks {
            values: vec![range.start],
            decimals: 0,
        };
    }
    // The smallest nice spacing that fits: ticks at k * spacing inside the range number at
    // most 1 + span / spacing.
    let wanted = span / (max_ticks - 1) as f64;
    let mut exponent = wanted.log10().floor() as i32;
    let mut mantissa = 1u32;
    let spacing = loop {
        let spacing = f64::from(mantissa) * 10f64.powi(exponent);
        if spacing >= wanted * (1.0 - 1e-9) && (!integers || spacing >= 1.0) {
            break spacing;
        }
        (mantissa, exponent) = match mantissa {
            1 => (2, exponent),
            2 => (5, exponent),
            _ => (1, exponent + 1),
        };
    };
    let first = (range.start / spacing - 1e-9).ceil() as i64;
    let last = (range.end / spacing + 1e-9).floor() as i64;
    let values = (first..=last).map(|k| k as f64 * spacing).collect();
    Ticks {
        values,
        decimals: usize::try_from(-exponent).unwrap_or(0),
    }
}

/// A value range for the y axis: the data's range widened by `pad` of its span on each side,
/// never below zero for data that never is (losses and distances), and a little room around
/// a constant.
pub(super) fn padded(lo: f64, hi: f64, pad: f64) -> Range<f64> {
    let span = hi - lo;
    let margin = if span > 0.0 {
        span * pad
    } else if lo != 0.0 {
        lo.abs() * 0.1
    } else {
        0.5
    };
    let start = if lo >= 0.0 { (lo - margin).max(0.0) } else { lo - margin };
    start..hi + margin
}

/// The x range of the steps: exactly first..last, or a step either side of a single one, so
/// that it sits in the middle (a tick left of step 0 has no label).
pub(super) fn step_range(first: u64, last: u64) -> Range<f64> {
    if last > first {
        first as f64..last as f64
    } else {
        first as f64 - 1.0..first as f64 + 1.0
    }
}

/// A tick label for a step axis; ticks are whole numbers (see [`ticks`]).
pub(super) fn format_step_tick(value: f64) -> String {
    if value < 0.0 {
        return String::new();
    }
    crate::format::thousands(value.round() as u64)
}

/// A tick label with the decimals its axis needs; "-0.0" is shown as "0.0".
pub(super) fn format_value(value: f64, decimals: usize) -> String {
    let text = format!("{value:.decimals$}");
    if text.starts_with('-') && text[1..].chars().all(|c| c == '0' || c == '.') {
        return text[1..].to_string();
    }
    text
}

/// A value for a note (the best score): four significant digits.
pub(super) fn format_significant(value: f64) -> String {
    if value == 0.0 || !value.is_finite() {
        return format!("{value}");
    }
    let decimals = (3 - value.abs().log10().floor() as i32).clamp(0, 12) as usize;
    format!("{value:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_use_nice_spacings_and_fit_the_budget() {
        let t = ticks(&(0.0..2.0), 9, false);
        // 0.25 is not a nice spacing: the next one is 0.5.
        assert_eq!(t.values, vec![0.0, 0.5, 1.0, 1.5, 2.0]);
        assert_eq!(t.decimals, 1);
        let t = ticks(&(0.013..0.087), 8, false);
        assert_eq!(t.decimals, 2);
        assert_eq!(t.values.len(), 4);
        assert!((t.values[0] - 0.02).abs() < 1e-12 && (t.values[3] - 0.08).abs() < 1e-12);
        for max in 2..20 {
            let t = ticks(&(3.7..1234.5), max, false);
            assert!(t.values.len() <= max, "{max}: {:?}", t.values);
            assert!(t.values.len() >= max / 3, "{max}: {:?}", t.values);
            assert!(t.values.iter().all(|v| (3.7..=1234.5).contains(v)));
        }
    }

    #[test]
    fn step_ticks_are_whole_numbers() {
        let t = ticks(&(0.0..60_000.0), 8, true);
        assert_eq!(
            t.values,
            vec![0.0, 10_000.0, 20_000.0, 30_000.0, 40_000.0, 50_000.0, 60_000.0]
        );
        assert_eq!(t.decimals, 0);
        let t = ticks(&(4.0..6.0), 10, true);
        assert_eq!(t.values, vec![4.0, 5.0, 6.0]);
    }

    #[test]
    fn degenerate_ranges_give_one_tick() {
        assert_eq!(ticks(&(1.0..1.0), 8, false).values, vec![1.0]);
        assert_eq!(ticks(&(f64::NAN..1.0), 8, false).values.len(), 1);
    }

    #[test]
    fn padding_stays_at_or_above_zero_for_positive_data() {
        assert_eq!(padded(0.0, 10.0, 0.1), 0.0..11.0);
        assert_eq!(padded(5.0, 5.0, 0.1), 4.5..5.5);
        assert_eq!(padded(0.25, 0.25, 0.1), 0.225..0.275);
        assert_eq!(padded(-1.0, 1.0, 0.5), -2.0..2.0);
        assert_eq!(padded(0.0, 0.0, 0.1), 0.0..0.5);
    }

    #[test]
    fn step_ranges_are_never_empty() {
        assert_eq!(step_range(0, 60_000), 0.0..60_000.0);
        assert_eq!(step_range(0, 0), -1.0..1.0);
        assert_eq!(step_range(7, 7), 6.0..8.0);
    }

    #[test]
    fn labels_read_well() {
        assert_eq!(format_step_tick(60_000.0), "60,000");
        assert_eq!(format_step_tick(-1.0), "");
        assert_eq!(format_value(0.30000000000000004, 1), "0.3");
        assert_eq!(format_value(-0.00001, 2), "0.00");
        assert_eq!(format_value(-1.5, 1), "-1.5");
        assert_eq!(format_significant(0.041234), "0.04123");
        assert_eq!(format_significant(12.5), "12.50");
    }
}
