//! The status server: plain HTTP/1.1, read-only, three routes.
//!
//! - `/`: the page (`page.html`), which polls `/status.json`;
//! - `/status.json`: the board's [`StatusSnapshot`](super::StatusSnapshot);
//! - `/samples/latest.png`: the latest sample grid, 404 before the first one.
//!
//! Built on hyper's HTTP/1 connection directly (tonic already brings it in) rather than a
//! router: three fixed routes need no routing crate, and the accept loop is ours, so the page
//! cannot take more than [`MAX_CONNECTIONS`] of the process's file descriptors (it shares them
//! with the workers' connections) nor keep one for more than [`MAX_CONNECTION_SECS`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

use super::board::StatusBoard;

/// The page, compiled in: no files to install, nothing to build.
const PAGE: &str = include_str!("page.html");

/// Connections served at once; further clients wait in the listen backlog. A page polls over
/// one kept-alive connection, so this is room for dozens of viewers.
const MAX_CONNECTIONS: usize = 64;
/// A connection is asked to close after this long (a browser simply reconnects), so an idle
/// kept-alive one cannot hold its place for ever.
const MAX_CONNECTION_SECS: u64 = 60;
/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection asked to close may take to finish its response.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The page only runs its own inline script and style, loads images and JSON from this server
/// and cannot be framed: a worker's address shown in the table cannot turn into markup.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                           img-src 'self'; connect-src 'self'; frame-ancestors 'none'";

/// Serves the status page on `listener` until `shutdown` completes, then lets open
/// connections finish their responses (at most a few seconds) and returns. Failed accepts
/// are logged and retried: the page must never take the run down.
pub async fn serve_status(listener: TcpListener, board: StatusBoard, shutdown: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (closing, close_requested) = watch::channel(());
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    tracing::warn!(%error, "status page: accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        connections.spawn(serve_connection(stream, board.clone(), close_requested.clone(), permit));
    }
    drop(closing);
    let drained = tokio::time::timeout(CLOSE_GRACE * 2, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
    }
}

async fn serve_connection(
    stream: TcpStream,
    board: StatusBoard,
    mut close_requested: watch::Receiver<()>,
    _permit: OwnedSemaphorePermit,
) {
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let response = respond(&board, request.method(), request.uri().path());
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let lifetime = tokio::time::sleep(Duration::from_secs(MAX_CONNECTION_SECS));
    tokio::pin!(lifetime);
    // Until a close is asked for (shutdown, or the lifetime is up): then the response in
    // flight may finish, within CLOSE_GRACE.
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = close_requested.changed() => {
            connection.as_mut().graceful_shutdown();
            tokio::time::timeout(CLOSE_GRACE, connection).await.unwrap_or(Ok(()))
        }
        () = &mut lifetime => {
            connection.as_mut().graceful_shutdown();
            tokio::time::timeout(CLOSE_GRACE, connection).await.unwrap_or(Ok(()))
        }
    };
    if let Err(error) = result {
        // A browser closing its tab mid-request, a client too slow with its headers.
        tracing::debug!(%error, "status page: connection ended");
    }
}

/// The response to a request for `path`: the routing, as a pure function of the board.
fn respond(board: &StatusBoard, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "the status page is read-only: GET only\n",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/" | "/index.html" => {
            let mut response = body(
                StatusCode::OK,
                "text/html; charset=utf-8",
                Bytes::from_static(PAGE.as_bytes()),
            );
            response
                .headers_mut()
                .insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_POLICY));
            response
        }
        "/status.json" => match serde_json::to_vec(&board.snapshot()) {
            Ok(json) => body(StatusCode::OK, "application/json", Bytes::from(json)),
            Err(error) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("could not write the status as JSON: {error}\n"),
            ),
        },
        "/samples/latest.png" => match board.latest_sample() {
            Some((_step, png)) => body(StatusCode::OK, "image/png", png),
            None => text(
                StatusCode::NOT_FOUND,
                "no sample grid yet: the coordinator makes one at each checkpoint\n",
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            &format!("not found: {path}; the status server has /, /status.json and /samples/latest.png\n"),
        ),
    }
}

fn text(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    body(status, "text/plain; charset=utf-8", Bytes::from(message.to_owned()))
}

fn body(status: StatusCode, content_type: &'static str, bytes: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(bytes));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Every answer is the state of the moment: a cached one would show a stale run.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}
