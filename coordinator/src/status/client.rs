//! `forger-coordinator status URL`: fetches `URL/status.json` and prints it for a terminal.
//!
//! The fetch is one HTTP/1.1 GET on hyper's client connection (tonic already brings hyper
//! in; a general client such as reqwest would add a TLS stack and a connection pool that a
//! single plain-HTTP request does not need), under one deadline for connecting, the answer
//! and its body. [`render`] is a pure function of the snapshot, so its text is testable.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;

use super::snapshot::StatusSnapshot;
use crate::format::{duration, thousands};
use crate::{CoordinatorError, Result};

/// How long the whole fetch may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// A status is tens of kilobytes; a server sending more is not the status page.
const MAX_BODY_BYTES: usize = 16 << 20;

/// What `forger-coordinator status` prints: the raw JSON with `json`, else [`render`]'s text.
pub async fn status_command(url: &str, json: bool, timeout: Duration) -> Result<String> {
    let body = fetch_status_json(url, timeout).await?;
    // Checked even for --json, so that a page that is not forger's is refused either way.
    let snapshot = parse_status(url, &body)?;
    if json {
        let mut text = String::from_utf8(body.to_vec()).map_err(|_| CoordinatorError::StatusMalformed {
            url: url.to_owned(),
            what: "the answer is not UTF-8 text".to_owned(),
        })?;
        // A line of its own, so a shell prompt does not follow on it.
        if !text.ends_with('\n') {
            text.push('\n');
        }
        return Ok(text);
    }
    Ok(render(&snapshot))
}

/// Fetches and parses `URL/status.json`.
pub async fn fetch_status(url: &str, timeout: Duration) -> Result<StatusSnapshot> {
    let body = fetch_status_json(url, timeout).await?;
    parse_status(url, &body)
}

/// The address of the JSON for the page at `url`: `http://` is assumed when no scheme is
/// given, and `status.json` is appended unless the URL already names it (so a page behind a
/// path prefix, `http://host/forger/`, works too).
pub fn status_json_url(url: &str) -> Result<Uri> {
    let bad = |reason: &str| CoordinatorError::StatusUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let uri: Uri = full
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(bad("the status page is plain HTTP: use http://")),
        _ => return Err(bad("expected an http:// address")),
    }
    let Some(authority) = uri.authority() else {
        return Err(bad("no host"));
    };
    if authority.as_str().contains('@') {
        return Err(bad("the status page takes no user name or password"));
    }
    let path = uri.path();
    let path = if path.ends_with("/status.json") {
        path.to_owned()
    } else {
        format!("{}/status.json", path.trim_end_matches('/'))
    };
    Uri::builder()
        .scheme("http")
        .authority(authority.clone())
        .path_and_query(path)
        .build()
        .map_err(|e| bad(&e.to_string()))
}

/// The body of `URL/status.json`, after a 200.
pub async fn fetch_status_json(url: &str, timeout: Duration) -> Result<Bytes> {
    let uri = status_json_url(url)?;
    match tokio::time::timeout(timeout, get(&uri)).await {
        Ok(Ok((StatusCode::OK, body))) => Ok(body),
        Ok(Ok((status, body))) => Err(CoordinatorError::StatusHttp {
            url: uri.to_string(),
            status: status.to_string(),
            body: excerpt(&body),
        }),
        Ok(Err(reason)) => Err(CoordinatorError::StatusUnreachable {
            url: uri.to_string(),
            reason,
        }),
        Err(_) => Err(CoordinatorError::StatusUnreachable {
            url: uri.to_string(),
            reason: format!("no complete answer within {:.1} s", timeout.as_secs_f64()),
        }),
    }
}

/// Parses a status, naming what is wrong with one that does not parse.
pub fn parse_status(url: &str, body: &[u8]) -> Result<StatusSnapshot> {
    serde_json::from_slice(body).map_err(|e| CoordinatorError::StatusMalformed {
        url: url.to_owned(),
        what: e.to_string(),
    })
}

/// One GET: the status and the body, or why there is none.
async fn get(uri: &Uri) -> std::result::Result<(StatusCode, Bytes), String> {
    let host = uri.host().unwrap_or_default();
    let address = format!("{host}:{}", uri.port_u16().unwrap_or(80));
    let stream = tokio::net::TcpStream::connect(&address)
        .await
        .map_err(|e| format!("connect to {address}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    // The connection runs beside the request, in a set that aborts it when dropped: on a
    // timeout too, so a silent server's socket is closed at once.
    let mut driver = tokio::task::JoinSet::new();
    driver.spawn(connection);
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let request = Request::get(uri.path())
        .header(
            header::HOST,
            HeaderValue::from_str(authority).map_err(|e| e.to_string())?,
        )
        .header(header::ACCEPT, HeaderValue::from_static("application/json"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    drop(sender);
    driver.abort_all();
    result
}

/// The start of an error answer's body, on one line.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line,
    }
}

/// The status as a compact summary for a terminal.
pub fn render(s: &StatusSnapshot) -> String {
    let mut out = String::new();
    let resumed = if s.job.resumed_from > 0 {
        format!(", resumed from step {}", thousands(s.job.resumed_from))
    } else {
        String::new()
    };
    let _ = writeln!(out, "run       {}{resumed}", s.job.run_dir);
    let _ = writeln!(out, "phase     {}", s.phase);
    let _ = writeln!(
        out,
        "step      {} / {}  {:.1}%  {}",
        thousands(s.step),
        thousands(s.steps_total),
        100.0 * s.progress,
        bar(s.progress, 30)
    );
    let rate = match (s.steps_per_sec, s.images_per_sec) {
        (Some(steps), Some(images)) => format!("{steps:.2} steps/s, {images:.0} images/s"),
        _ => "no rate yet".to_owned(),
    };
    let eta = s.eta_secs.map_or_else(|| "unknown".to_owned(), duration);
    let elapsed = duration(s.now_unix - s.job.started_at_unix);
    let _ = writeln!(out, "rate      {rate}   ETA {eta}   elapsed {elapsed}");
    match &s.latest {
        Some(l) => {
            let trained = match (l.train_d, l.train_g) {
                (true, true) => "D and G",
                (true, false) => "D only",
                (false, true) => "G only",
                (false, false) => "neither",
            };
            let _ = writeln!(
                out,
                "losses    step {}: D {} (real {}, fake {})  G {}   trained {trained}",
                thousands(l.step),
                loss(l.loss_d),
                loss(l.loss_d_real),
                loss(l.loss_d_fake),
                loss(l.loss_g)
            );
        }
        None => {
            let _ = writeln!(out, "losses    no step completed yet");
        }
    }
    if let Some(step) = s.sample_step {
        let _ = writeln!(out, "samples   latest grid at step {}", thousands(step));
    }
    let scored: Vec<_> = s
        .quality
        .iter()
        .filter_map(|q| q.swd.map(|swd| (q.step, swd)))
        .collect();
    if let Some(&(step, swd)) = scored.last() {
        let (best_step, best) = scored
            .iter()
            .copied()
            .fold((step, swd), |best, q| if q.1 < best.1 { q } else { best });
        let _ = writeln!(
            out,
            "quality   SWD {swd:.4} at step {} (lower is better; best {best:.4} at step {}, {} scores)",
            thousands(step),
            thousands(best_step),
            s.quality.len()
        );
    }
    let _ = writeln!(out, "workers   {} connected", s.workers_connected);
    if !s.workers.is_empty() {
        let rows: Vec<[String; 7]> = s
            .workers
            .iter()
            .map(|w| {
                [
                    format!("{} ({})", w.id, w.slot),
                    w.address.clone(),
                    w.device.clone(),
                    w.replicas.to_string(),
                    ranges(&w.shards),
                    w.step_seconds.map_or_else(|| "-".to_owned(), |t| format!("{t:.2} s")),
                    if w.last_seen_secs_ago.is_finite() {
                        format!("{:.1} s ago", w.last_seen_secs_ago)
                    } else {
                        "-".to_owned()
                    },
                ]
            })
            .collect();
        let head = [
            "ID (SLOT)",
            "ADDRESS",
            "DEVICE",
            "REPLICAS",
            "SHARDS",
            "STEP",
            "LAST SEEN",
        ]
        .map(String::from);
        table(&mut out, &head, &rows);
    }
    out
}

fn table(out: &mut String, head: &[String; 7], rows: &[[String; 7]]) {
    let mut widths = head.clone().map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(head).chain(rows) {
        let mut line = String::from("  ");
        for (cell, width) in row.iter().zip(widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn loss(value: Option<f64>) -> String {
    value.map_or_else(|| "NaN".to_owned(), |v| format!("{v:.4}"))
}

fn bar(fraction: f64, width: usize) -> String {
    let filled = ((fraction.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// Shards as ranges: [0, 1, 2, 5] as "0-2,5".
fn ranges(shards: &[u32]) -> String {
    let mut sorted = shards.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_client_formats_shards_and_bars() {
        // Counts and durations are `crate::format`'s, tested there.
        assert_eq!(ranges(&[5, 0, 2, 1]), "0-2,5");
        assert_eq!(ranges(&[7]), "7");
        assert_eq!(ranges(&[]), "-");
        assert_eq!(bar(0.5, 4), "[##..]");
        assert_eq!(bar(2.0, 4), "[####]");
    }

    #[test]
    fn status_client_builds_the_json_address() {
        let url = |u: &str| status_json_url(u).map(|u| u.to_string());
        assert_eq!(
            url("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080/status.json"
        );
        assert_eq!(url("127.0.0.1:8080/").unwrap(), "http://127.0.0.1:8080/status.json");
        assert_eq!(url("http://host/forger/").unwrap(), "http://host/forger/status.json");
        assert_eq!(url("http://[::1]:9/status.json").unwrap(), "http://[::1]:9/status.json");
        for bad in ["https://host:1", "ftp://host", "http://user:pw@host:1", "http://"] {
            let error = status_json_url(bad).expect_err(bad);
            assert!(error.to_string().contains(bad), "{error}");
        }
    }

    #[test]
    fn status_client_names_what_is_malformed() {
        let error = parse_status("http://h:1", br#"{"job": 3}"#).expect_err("malformed");
        let message = error.to_string();
        assert!(
            message.contains("http://h:1") && message.contains("expected struct JobInfo at line 1 column 9"),
            "{message}"
        );
        let error = parse_status("http://h:1", b"<html>").expect_err("not json");
        assert!(error.to_string().contains("not a forger status"), "{error}");
    }
}
