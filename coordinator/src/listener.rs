//! The coordinator's one port serves two kinds of connection: gRPC (Join, FetchShard and the
//! Session) and the workers' data connections. Each accepted connection is told apart by its
//! first bytes, without consuming them, and handed to the gRPC server or to
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
    match tokio::time::timeout(FIRST_BYTES_TIMEOUT, starts_with_magic(&stream)).await {
        Ok(Ok(true)) => data_link::accept(stream, registry).await,
        Ok(Ok(false)) => {
            let _ = grpc.send(Ok(stream)).await;
        }
        Ok(Err(e)) => debug!(error = %e, "a connection failed before it said anything"),
        Err(_) => debug!("a connection sent nothing within 10 s; closed"),
    }
}

/// Peeks until the first bytes either are the data connection's magic or cannot be.
async fn starts_with_magic(stream: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; DATA_MAGIC.len()];
    loop {
        let seen = stream.peek(&mut first).await?;
        if seen == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if !DATA_MAGIC.starts_with(&first[..seen]) {
            return Ok(false);
        }
        if seen == DATA_MAGIC.len() {
            return Ok(true);
        }
        // A prefix of the magic so far: the rest is on its way.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
