//! The coordinator's one port serves two kinds of connection: gRPC (Join, FetchShard and the
//! Session) and the workers' data connections. Each accepted connection is told apart by its
//! first byte, without consuming it, and handed to the gRPC server or to
//! [`data_link::accept`]. One port keeps deployment simple: one address to give workers, one
//! port to open in a firewall or publish from a container.

use std::time::Duration;

use forger_proto::data::DATA_MAGIC;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use crate::data_link;
use crate::registry::Registry;

/// How long a new connection may take to send its first bytes.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until the returned stream (the gRPC server's incoming connections)
/// is dropped.
pub fn route(listener: TcpListener, registry: Registry) -> ReceiverStream<std::io::Result<TcpStream>> {
    let (grpc, incoming) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = grpc.closed() => return,
            };
            match stream {
                Ok((stream, _)) => {
                    let (grpc, registry) = (grpc.clone(), registry.clone());
                    tokio::spawn(async move { dispatch(stream, grpc, registry).await });
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

async fn dispatch(stream: TcpStream, grpc: mpsc::Sender<std::io::Result<TcpStream>>, registry: Registry) {
    // Nagle's algorithm would hold the last small frames of a phase until the peer's delayed
    // ACK; tonic's own `tcp_nodelay` applies only to listeners it binds itself.
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "a connection closed as it was accepted");
        return;
    }
    match tokio::time::timeout(FIRST_BYTES_TIMEOUT, first_byte(&stream)).await {
        // HTTP/2 opens with "PRI * HT": one byte tells the two apart, and the data connection's
        // handshake reads the rest of its magic under its own timeout.
        Ok(Ok(byte)) if byte == DATA_MAGIC[0] => data_link::accept(stream, registry).await,
        Ok(Ok(_)) => {
            let _ = grpc.send(Ok(stream)).await;
        }
        Ok(Err(e)) => debug!(error = %e, "a connection failed before it said anything"),
        Err(_) => debug!("a connection sent nothing within 10 s; closed"),
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
