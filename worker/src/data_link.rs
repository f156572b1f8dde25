//! The worker's end of its data connection (see `forger_proto::data`): opened right after
//! Join, it carries the gradients up and the parameters down, beside the Session that carries
//! everything else.

use forger_common::wire::CHUNK_VALUES;
use forger_proto::data::{self, FrameLink};
use forger_proto::{PROTOCOL_VERSION, pb};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tonic::transport::Uri;

use crate::error::{Result, WorkerError};

/// The largest parameter payload the coordinator sends: one chunk of f32 values.
const MAX_PAYLOAD: usize = CHUNK_VALUES * 4;

/// Opens the data connection to the coordinator at `url` (its gRPC URL: the same host and
/// port serve both) for the worker that joined as `worker_id` with `token`.
pub async fn open(url: &str, worker_id: u64, token: &[u8]) -> Result<TcpStream> {
    let address = host_and_port(url)?;
    let hello = pb::DataHello {
        protocol_version: PROTOCOL_VERSION,
        worker_id,
        session_token: token.to_vec().into(),
    };
    data::connect(&address, &hello).await.map_err(|e| {
        // A refusal (the place was lost, say) and a broken connection both mean: join again.
        WorkerError::Disconnected(format!("data connection to {address}: {e}"))
    })
}

/// `host:port` of an `http://host:port` URL; without a port, HTTP's 80.
fn host_and_port(url: &str) -> Result<String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| WorkerError::Protocol(format!("bad coordinator address `{url}`: {e}")))?;
    let authority = uri
        .authority()
        .ok_or_else(|| WorkerError::Protocol(format!("the coordinator address `{url}` names no host")))?;
    Ok(match authority.port_u16() {
        Some(_) => authority.as_str().to_string(),
        None => format!("{}:80", authority.host()),
    })
}

/// The worker's data connection: gradient chunks up, parameter chunks down.
pub type DataLink = FrameLink<pb::GradientChunk, pb::ParamsChunk>;

/// Opens the link on an accepted connection.
pub fn spawn(stream: TcpStream) -> DataLink {
    FrameLink::spawn(stream, MAX_PAYLOAD)
}

/// Where the compute thread's messages go: gradients on the data connection, everything else
/// on the Session.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub session: mpsc::Sender<pb::WorkerMessage>,
    pub data: mpsc::Sender<pb::GradientChunk>,
}

impl Outbound {
    /// Sends from a thread outside the runtime; fails when the connection is gone.
    pub fn blocking_send(&self, kind: pb::worker_message::Kind) -> Result<()> {
        let sent = match kind {
            pb::worker_message::Kind::Gradient(chunk) => self.data.blocking_send(chunk).is_ok(),
            kind => self
                .session
                .blocking_send(pb::WorkerMessage { kind: Some(kind) })
                .is_ok(),
        };
        sent.then_some(()).ok_or(WorkerError::SessionClosed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_connection_goes_to_the_grpc_host_and_port() {
        assert_eq!(host_and_port("http://10.0.0.5:50051").unwrap(), "10.0.0.5:50051");
        assert_eq!(host_and_port("http://coordinator:7000/").unwrap(), "coordinator:7000");
        assert_eq!(host_and_port("http://[::1]:50051").unwrap(), "[::1]:50051");
        assert_eq!(host_and_port("http://coordinator").unwrap(), "coordinator:80");
        assert!(host_and_port("not a url").is_err());
    }
}
