//! The coordinator's one port serves two kinds of connection: gRPC (Join, FetchShard and the
//! Session) and the workers' data connections. One port keeps deployment simple: one address
//! to give workers, one port to open in a firewall or publish from a container.
//!
//! Over TLS the two are told apart by the protocol the client named in the handshake (ALPN);
//! on an `--insecure` port, by the first byte, peeked without consuming it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use forger_proto::connection::Connection;
use forger_proto::data::DATA_MAGIC;
use forger_proto::tls::{ALPN_DATA, ServerSecurity};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use crate::data_link;
use crate::registry::Registry;

/// How long a new connection may take to finish its TLS handshake or send its first bytes.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once. A client that completes a handshake and then says nothing holds
/// its connection (HTTP/2 has no deadline for the first request); without a cap, enough of them
/// exhaust the process's file descriptors and the next checkpoint fails. At the cap new
/// connections are closed at once: joining waits, the run goes on. Two per worker process.
pub const MAX_CONNECTIONS: usize = 512;
/// Connections refused so far by this process, for logging them sparsely.
static REFUSED: AtomicU64 = AtomicU64::new(0);
/// A TLS connection opens with a handshake record, whose first byte is 22.
const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// Accepts connections until the returned stream (the gRPC server's incoming connections)
/// is dropped. Data connections go to `registry`; without one (a coordinator that only
/// answers that the run is over) they are closed.
pub fn route(
    listener: TcpListener,
    registry: Option<Registry>,
    security: ServerSecurity,
) -> ReceiverStream<std::io::Result<Connection>> {
    let (grpc, incoming) = mpsc::channel(16);
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        let mut turned_away = 0u64;
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = grpc.closed() => return,
            };
            match stream {
                Ok((stream, peer)) => {
                    let Ok(place) = places.clone().try_acquire_owned() else {
                        turned_away += 1;
                        // Logged 1, 2, 4, 8... times: a flood must not fill the disk with warnings.
                        if turned_away.is_power_of_two() {
                            warn!(%peer, turned_away, limit = MAX_CONNECTIONS, "too many open connections: closed a new one");
                        }
                        drop(stream);
                        continue;
                    };
                    let (grpc, registry, security) = (grpc.clone(), registry.clone(), security.clone());
                    tokio::spawn(async move { dispatch(stream, peer, place, grpc, registry, security).await });
                }
                Err(e) => {
                    // Out of file descriptors, say: the listener itself is fine, so wait and go on.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    ReceiverStream::new(incoming)
}

/// Where an accepted connection goes once its kind is known.
enum Kind {
    Grpc,
    Data,
}

async fn dispatch(
    stream: TcpStream,
    peer: SocketAddr,
    place: OwnedSemaphorePermit,
    grpc: mpsc::Sender<std::io::Result<Connection>>,
    registry: Option<Registry>,
    security: ServerSecurity,
) {
    // Nagle's algorithm would hold the last small frames of a phase until the peer's delayed
    // ACK; tonic's own `tcp_nodelay` applies only to listeners it binds itself.
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "a connection closed as it was accepted");
        return;
    }
    let local = stream.local_addr().ok();
    let opened = tokio::time::timeout(FIRST_BYTES_TIMEOUT, open(stream, local, peer, &security)).await;
    let (kind, connection) = match opened {
        Ok(Ok((kind, connection))) => (kind, connection.holding(place)),
        // A port probe (a load balancer's, a health check's) connects and closes at once.
        Ok(Err(Refusal::Silent(reason))) => return debug!(%peer, %reason, "a connection closed before it began"),
        Ok(Err(Refusal::Loud(refusal))) => {
            let refused = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
            // Logged 1, 2, 4, 8... times, with the count so far.
            if refused.is_power_of_two() {
                warn!(%peer, %refusal, refused, "refused a connection");
            }
            return;
        }
        Err(_) => return debug!(%peer, "a connection did not introduce itself within 10 s; closed"),
    };
    match (kind, registry) {
        (Kind::Grpc, _) => {
            let _ = grpc.send(Ok(connection)).await;
        }
        (Kind::Data, Some(registry)) => data_link::accept(connection, registry).await,
        (Kind::Data, None) => debug!(%peer, "a data connection to a coordinator with no run; closed"),
    }
}

/// Why a connection was closed before it was handed on.
enum Refusal {
    /// It closed or failed before saying anything: not worth a warning.
    Silent(String),
    /// It said something this port does not accept.
    Loud(String),
}

/// Completes the TLS handshake, or reads nothing on an insecure port, and says which kind of
/// connection this is.
async fn open(
    stream: TcpStream,
    local: Option<SocketAddr>,
    peer: SocketAddr,
    security: &ServerSecurity,
) -> Result<(Kind, Connection), Refusal> {
    match security {
        ServerSecurity::Insecure => {
            let first = first_byte(&stream).await.map_err(|e| Refusal::Silent(e.to_string()))?;
            let kind = match first {
                byte if byte == DATA_MAGIC[0] => Kind::Data,
                // HTTP/2 opens with "PRI * HT"; a TLS client would not be understood by either.
                TLS_HANDSHAKE_BYTE => {
                    return Err(Refusal::Loud(
                        "it opened a TLS handshake, but this coordinator runs --insecure: start the worker with \
                         --insecure too, or the coordinator with --credentials"
                            .into(),
                    ));
                }
                _ => Kind::Grpc,
            };
            Ok((kind, Connection::new(stream, local, Some(peer))))
        }
        ServerSecurity::Tls { acceptor, .. } => {
            let tls = acceptor.accept(stream).await.map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Refusal::Silent(e.to_string()),
                _ => Refusal::Loud(format!(
                    "the TLS handshake failed: {e} (a worker without --credentials, or with another cluster's?)"
                )),
            })?;
            let kind = match tls.get_ref().1.alpn_protocol() {
                Some(ALPN_DATA) => Kind::Data,
                _ => Kind::Grpc,
            };
            Ok((kind, Connection::new(tls, local, Some(peer))))
        }
    }
}

/// The first byte the peer sent, left unread. Waiting for more by peeking again would spin:
/// a peek returns at once while any byte is buffered.
async fn first_byte(stream: &TcpStream) -> std::io::Result<u8> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await? {
        0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
        _ => Ok(first[0]),
    }
}
