//! The status server on a real socket (port 0), read with a plain TCP client, and the
//! `status` client against it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::client::{self, DEFAULT_TIMEOUT};
use super::*;
use crate::CoordinatorError;

const WAIT: Duration = Duration::from_secs(10);

/// A status server on 127.0.0.1:0, stopped by `stop`.
struct TestServer {
    address: SocketAddr,
    board: StatusBoard,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let board = StatusBoard::new(job());
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_status(listener, board.clone(), async {
            let _ = stopped.await;
        }));
        TestServer {
            address,
            board,
            shutdown,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    async fn stop(self) {
        let _ = self.shutdown.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the server stops on shutdown")
            .expect("the server task did not panic");
    }
}

fn job() -> JobInfo {
    JobInfo {
        run_dir: "/runs/faces".to_owned(),
        steps_total: 60_000,
        batch_size: 64,
        shards: 2,
        started_at_unix: 1_700_000_000.0,
        resumed_from: 1000,
    }
}

fn step(step: u64, loss_d: f64) -> StepPoint {
    StepPoint {
        step,
        loss_d,
        loss_g: 1.25,
        loss_d_real: 0.25,
        loss_d_fake: 0.75,
        train_d: true,
        train_g: false,
        workers: 2,
        images: 128,
        seconds: 0.25,
    }
}

fn worker(id: u64) -> WorkerRow {
    WorkerRow {
        id,
        slot: id as u32,
        address: format!("10.0.0.{id}:5000"),
        device: "cuda:0".to_owned(),
        replicas: 1,
        shards: vec![id as u32 - 1],
        step_seconds: Some(0.2),
        last_seen_secs_ago: 0.5,
    }
}

/// A board as the trainer leaves it after steps 1001 to 1234.
fn fill(board: &StatusBoard) {
    board.set_phase("training");
    for s in 1001..=1234 {
        board.step_completed(step(s, 0.5 + (s % 10) as f64 / 100.0));
    }
    board.set_workers(vec![worker(1), worker(2)]);
    board.quality(1100, 0.07);
    board.quality(1200, 0.05);
}

/// A response read with a bare TCP client: status, headers (lowercase names), body.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

async fn raw(address: SocketAddr, method: &str, path: &str) -> Raw {
    tokio::time::timeout(WAIT, async {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        let request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.expect("read");
        let split = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
        let head = String::from_utf8(bytes[..split].to_vec()).expect("utf-8 head");
        let mut lines = head.split("\r\n");
        let status = lines.next().expect("status line").split(' ').nth(1).expect("code");
        let headers = lines
            .map(|line| {
                let (name, value) = line.split_once(':').expect("header");
                (name.trim().to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        Raw {
            status: status.parse().expect("numeric status"),
            headers,
            body: bytes[split + 4..].to_vec(),
        }
    })
    .await
    .expect("the server answers in time")
}

#[tokio::test]
async fn status_server_serves_the_page_with_its_elements() {
    let server = TestServer::start().await;
    let page = raw(server.address, "GET", "/").await;
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(
        page.header("content-security-policy")
            .is_some_and(|p| p.contains("default-src 'none'"))
    );
    let html = String::from_utf8(page.body).expect("utf-8");
    for id in [
        "phase",
        "conn",
        "step",
        "steps-total",
        "progress-bar",
        "progress-pct",
        "steps-per-sec",
        "images-per-sec",
        "eta",
        "loss-d",
        "loss-g",
        "trained",
        "sample-img",
        "loss-chart",
        "quality-body",
        "workers-body",
    ] {
        assert!(html.contains(&format!("id=\"{id}\"")), "the page lacks #{id}");
        let script = &html[html.find("<script>").expect("a script")..];
        assert!(script.contains(&format!("'{id}'")), "the script never fills #{id}");
    }
    assert!(html.contains("connection lost, retrying"));
    assert!(html.contains("fetch('status.json'"));
    // No external resources: no address but the SVG namespace's, no stylesheet links.
    let addresses = html.replace("http://www.w3.org/2000/svg", "");
    assert!(!addresses.contains("http://") && !addresses.contains("https://") && !html.contains("<link"));
    server.stop().await;
}

#[tokio::test]
async fn status_server_json_reads_back_as_the_values_pushed() {
    let server = TestServer::start().await;
    fill(&server.board);
    let answer = raw(server.address, "GET", "/status.json").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    let snap: StatusSnapshot = serde_json::from_slice(&answer.body).expect("a StatusSnapshot");
    assert_eq!(snap.job, job());
    assert_eq!(snap.phase, "training");
    assert_eq!((snap.step, snap.steps_total), (1234, 60_000));
    assert_eq!(snap.steps_per_sec, Some(4.0));
    assert_eq!(snap.images_per_sec, Some(512.0));
    assert_eq!(snap.eta_secs, Some((60_000.0 - 1234.0) / 4.0));
    let latest = snap.latest.as_ref().expect("latest");
    assert_eq!(
        (latest.step, latest.loss_d, latest.loss_g),
        (1234, Some(0.5 + 4.0 / 100.0), Some(1.25))
    );
    assert_eq!((latest.train_d, latest.train_g), (true, false));
    assert_eq!(snap.workers_connected, 2);
    assert_eq!(snap.workers[1].address, "10.0.0.2:5000");
    assert_eq!(snap.quality.len(), 2);
    assert_eq!(
        snap.quality[1],
        QualityPoint {
            step: 1200,
            swd: Some(0.05)
        }
    );
    assert_eq!(snap.history.step.len(), 234);
    assert_eq!(snap.history.step.first(), Some(&1001));
    assert_eq!(snap.history.loss_d[3], Some((0.5 + 4.0 / 100.0) as f32));
    // Everything but the clock and the workers' ages is what the board holds.
    let mut board = server.board.snapshot();
    board.now_unix = snap.now_unix;
    board.workers = snap.workers.clone();
    assert_eq!(board, snap);
    server.stop().await;
}

#[tokio::test]
async fn status_server_writes_non_finite_losses_as_null() {
    let server = TestServer::start().await;
    server.board.step_completed(StepPoint {
        loss_g: f64::NEG_INFINITY,
        ..step(1001, f64::NAN)
    });
    let answer = raw(server.address, "GET", "/status.json").await;
    let value: serde_json::Value = serde_json::from_slice(&answer.body).expect("valid JSON");
    assert_eq!(value["latest"]["loss_d"], serde_json::Value::Null);
    assert_eq!(value["latest"]["loss_g"], serde_json::Value::Null);
    assert_eq!(value["history"]["loss_d"][0], serde_json::Value::Null);
    assert_eq!(value["latest"]["loss_d_real"], serde_json::json!(0.25));
    let snap: StatusSnapshot = serde_json::from_value(value).expect("a StatusSnapshot");
    assert_eq!(snap.latest.expect("latest").loss_d, None);
    server.stop().await;
}

#[tokio::test]
async fn status_server_serves_the_latest_sample_grid() {
    let server = TestServer::start().await;
    let missing = raw(server.address, "GET", "/samples/latest.png").await;
    assert_eq!(missing.status, 404);
    assert!(String::from_utf8_lossy(&missing.body).contains("no sample grid yet"));
    let png = vec![0x89, b'P', b'N', b'G', 1, 2, 3, 0, 255];
    server.board.sample_grid(2000, png.clone());
    // The page's cache-busting query does not change the route.
    let grid = raw(server.address, "GET", "/samples/latest.png?step=2000").await;
    assert_eq!(grid.status, 200);
    assert_eq!(grid.header("content-type"), Some("image/png"));
    assert_eq!(grid.header("cache-control"), Some("no-store"));
    assert_eq!(grid.body, png);
    server.stop().await;
}

#[tokio::test]
async fn status_server_is_read_only_and_names_its_routes() {
    let server = TestServer::start().await;
    let post = raw(server.address, "POST", "/status.json").await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    let unknown = raw(server.address, "GET", "/admin").await;
    assert_eq!(unknown.status, 404);
    assert!(String::from_utf8_lossy(&unknown.body).contains("/status.json"));
    server.stop().await;
}

#[tokio::test]
async fn status_server_stops_with_an_idle_connection_open() {
    let server = TestServer::start().await;
    // A browser's kept-alive connection, between two polls.
    let mut idle = TcpStream::connect(server.address).await.expect("connect");
    idle.write_all(b"GET /status.json HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("send");
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.expect("an answer");
    assert_eq!(&first, b"HTTP/1.1 200");
    server.stop().await;
    // The server closed it: the rest of the answer, then the end.
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, idle.read_to_end(&mut rest))
        .await
        .expect("closed")
        .expect("read");
}

#[test]
fn status_client_renders_a_snapshot() {
    let board = StatusBoard::new(job());
    let empty = client::render(&board.snapshot());
    assert!(empty.contains("step      1,000 / 60,000  1.7%"), "{empty}");
    assert!(
        empty.contains("no rate yet") && empty.contains("ETA unknown"),
        "{empty}"
    );
    assert!(empty.contains("no step completed yet"), "{empty}");
    assert!(!empty.contains("quality") && !empty.contains("samples"), "{empty}");
    fill(&board);
    board.sample_grid(1200, vec![1]);
    let mut snap = board.snapshot();
    snap.now_unix = snap.job.started_at_unix + 3725.0;
    let text = client::render(&snap);
    for expected in [
        "run       /runs/faces, resumed from step 1,000",
        "phase     training",
        "step      1,234 / 60,000  2.1%  [#.............................]",
        "rate      4.00 steps/s, 512 images/s   ETA 4h 04m   elapsed 1h 02m",
        "losses    step 1,234: D 0.5400 (real 0.2500, fake 0.7500)  G 1.2500   trained D only",
        "samples   latest grid at step 1,200",
        "quality   SWD 0.0500 at step 1,200 (lower is better; best 0.0500 at step 1,200, 2 scores)",
        "workers   2 connected",
        "ID (SLOT)  ADDRESS",
        "1 (1)      10.0.0.1:5000  cuda:0  1         0       0.20 s",
        "2 (2)      10.0.0.2:5000  cuda:0  1         1       0.20 s",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
}

#[tokio::test]
async fn status_client_fetches_from_the_real_server() {
    let server = TestServer::start().await;
    fill(&server.board);
    let snap = client::fetch_status(&server.url(), DEFAULT_TIMEOUT)
        .await
        .expect("fetch");
    assert_eq!((snap.step, snap.phase.as_str()), (1234, "training"));
    assert_eq!(snap.workers.len(), 2);
    let text = client::status_command(&format!("{}/", server.address), false, DEFAULT_TIMEOUT)
        .await
        .expect("status");
    assert!(text.contains("step      1,234 / 60,000"), "{text}");
    assert!(text.contains("10.0.0.2:5000"), "{text}");
    let json = client::status_command(&server.url(), true, DEFAULT_TIMEOUT)
        .await
        .expect("--json");
    let raw: StatusSnapshot = serde_json::from_str(&json).expect("the raw JSON");
    assert_eq!(raw.step, 1234);
    server.stop().await;
}

#[tokio::test]
async fn status_client_says_what_went_wrong() {
    // Nothing listening: a port just freed.
    let free = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = free.local_addr().expect("address");
    drop(free);
    let error = client::fetch_status(&format!("http://{address}"), DEFAULT_TIMEOUT)
        .await
        .expect_err("refused");
    assert!(matches!(error, CoordinatorError::StatusUnreachable { .. }), "{error}");
    assert!(
        error.to_string().starts_with(&format!(
            "could not reach the status page at http://{address}/status.json: "
        )),
        "{error}"
    );

    // The status server, but under a path it does not have.
    let server = TestServer::start().await;
    let error = client::fetch_status(&format!("{}/elsewhere/", server.url()), DEFAULT_TIMEOUT)
        .await
        .expect_err("404");
    let message = error.to_string();
    assert!(matches!(error, CoordinatorError::StatusHttp { .. }), "{message}");
    assert!(
        message.contains("404 Not Found") && message.contains("not found: /elsewhere/status.json"),
        "{message}"
    );
    server.stop().await;

    // Something that answers 200 with JSON that is not a status, and something that never
    // answers at all.
    let other = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let other_address = other.local_addr().expect("address");
    let fake = tokio::spawn(async move {
        // Twice the same JSON: for the summary, then for --json, which must not pass it on.
        for _ in 0..2 {
            let (mut first, _) = other.accept().await.expect("accept");
            let mut request = [0u8; 1024];
            let _ = first.read(&mut request).await.expect("read");
            let body = r#"{"phase": "training"}"#;
            let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            first.write_all(answer.as_bytes()).await.expect("write");
        }
        let (silent, _) = other.accept().await.expect("accept");
        // Held open, unanswered, until the client gives up.
        let mut silent = silent;
        let _ = silent.read_to_end(&mut Vec::new()).await;
    });
    let error = client::fetch_status(&format!("http://{other_address}"), DEFAULT_TIMEOUT)
        .await
        .expect_err("malformed");
    assert!(matches!(error, CoordinatorError::StatusMalformed { .. }), "{error}");
    assert!(error.to_string().contains("missing field `job`"), "{error}");
    let error = client::status_command(&format!("http://{other_address}"), true, DEFAULT_TIMEOUT)
        .await
        .expect_err("--json refuses what is not a status too");
    assert!(matches!(error, CoordinatorError::StatusMalformed { .. }), "{error}");
    let error = client::fetch_status(&format!("http://{other_address}"), Duration::from_millis(300))
        .await
        .expect_err("timed out");
    assert!(error.to_string().contains("no complete answer within 0.3 s"), "{error}");
    tokio::time::timeout(WAIT, fake)
        .await
        .expect("the fake server ends")
        .expect("no panic");
}

/// The page's script at least parses, where node is installed (the page has no build step
/// that would catch a syntax error).
#[test]
fn status_page_script_parses_with_node() {
    let html = include_str!("page.html");
    let start = html.find("<script>").expect("a script") + "<script>".len();
    let end = html[start..].find("</script>").expect("its end") + start;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("page.js");
    std::fs::write(&path, &html[start..end]).expect("write the script");
    match std::process::Command::new("node").arg("--check").arg(&path).output() {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("node is not installed: the page's script was not checked");
        }
        Err(error) => panic!("could not run node: {error}"),
        Ok(out) => assert!(
            out.status.success(),
            "the page's script does not parse:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
