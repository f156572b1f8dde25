//! The worker's end of its data connection (see `forger_proto::data`): opened right after
//! Join, it carries the gradients up and the parameters down, beside the Session that carries
//! everything else.

use forger_common::wire::CHUNK_VALUES;
use forger_proto::connection::Connection;
use forger_proto::data::{self, FrameLink};
use forger_proto::tls::ClientSecurity;
use forger_proto::{PROTOCOL_VERSION, pb};
use tokio::sync::mpsc;
use tonic::transport::Uri;

use crate::error::{Result, WorkerError};

/// The largest parameter payload the coordinator sends: one chunk of f32 values.
const MAX_PAYLOAD: usize = CHUNK_VALUES * 4;

/// Opens the data connection to the coordinator at `url` (its gRPC URL: the same host and
/// port serve both) for the worker that joined as `worker_id` with `token`.
pub async fn open(url: &str, security: &ClientSecurity, worker_id: u64, token: &[u8]) -> Result<Connection> {
    let (address, host) = host_and_port(url)?;
    let hello = pb::DataHello {
        protocol_version: PROTOCOL_VERSION,
        worker_id,
        session_token: token.to_vec().into(),
    };
    data::connect(&address, &host, security, &hello).await.map_err(|e| {
        // A refusal (the place was lost, say) and a broken connection both mean: join again.
        WorkerError::Disconnected(format!("data connection to {address}: {e}"))
    })
}

/// `host:port` of an `http://host:port` or `https://host:port` URL (without a port, 80 or
/// 443), and the host alone. The scheme only spells the address: TLS is on unless the worker
/// runs `--insecure`.
pub fn host_and_port(url: &str) -> Result<(String, String)> {
    let uri: Uri = url
        .parse()
        .map_err(|e| WorkerError::Protocol(format!("bad coordinator address `{url}`: {e}")))?;
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => {
            return Err(WorkerError::Protocol(format!(
                "`{url}` is not a coordinator URL: write it as http://HOST:PORT"
            )));
        }
    };
    let authority = uri
        .authority()
        .ok_or_else(|| WorkerError::Protocol(format!("the coordinator address `{url}` names no host")))?;
    let host = authority.host().to_string();
    let address = match authority.port_u16() {
        Some(port) => format!("{host}:{port}"),
        None => format!("{host}:{default_port}"),
    };
    Ok((address, host))
}

/// The worker's data connection: gradient chunks up, parameter chunks down.
pub type DataLink = FrameLink<pb::GradientChunk, pb::ParamsChunk>;

/// Opens the link on an accepted connection.
pub fn spawn(stream: Connection) -> DataLink {
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
        let address = |url| host_and_port(url).unwrap().0;
        assert_eq!(address("http://10.0.0.5:50051"), "10.0.0.5:50051");
        assert_eq!(address("http://coordinator:7000/"), "coordinator:7000");
        assert_eq!(address("http://[::1]:50051"), "[::1]:50051");
        assert_eq!(address("http://coordinator"), "coordinator:80");
        assert_eq!(address("https://coordinator"), "coordinator:443");
        assert_eq!(host_and_port("https://coordinator:50051").unwrap().1, "coordinator");
        assert!(host_and_port("not a url").is_err());
        assert!(host_and_port("coordinator:50051").is_err());
        assert!(host_and_port("ftp://coordinator:50051").is_err());
    }
}
