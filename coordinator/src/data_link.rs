//! The coordinator's end of the workers' data connections (see `forger_proto::data`): the
//! handshake that ties a connection to a joined worker, then a reader task that turns
//! gradient frames into the trainer's events and a writer task that sends parameter frames.

use std::time::Duration;

use forger_common::wire::CHUNK_VALUES;
use forger_proto::connection::Connection;
use forger_proto::data::{self, FrameError, FrameReader};
use forger_proto::{PROTOCOL_VERSION, pb};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::registry::Registry;
use crate::service::Inbound;

/// A data connection must introduce itself within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Parameter frames queued towards one worker before the trainer waits for it to read.
const OUTBOUND_QUEUE: usize = 64;
/// The largest payload a worker may send: one chunk of f32 values (bf16 chunks are half).
const MAX_PAYLOAD: usize = CHUNK_VALUES * 4;

/// Reads a new data connection's hello and, when the worker and its token check out, welcomes
/// it and parks it in the registry until the worker's Session opens. A refusal is sent to the
/// worker before the connection closes.
pub async fn accept(mut stream: Connection, registry: Registry) {
    let from = stream.peer();
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut stream)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => return refuse(stream, &from, &format!("a bad hello: {e}")).await,
        Err(_) => return refuse(stream, &from, "no hello within 10 s").await,
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let refusal = format!(
            "protocol version {} is not the coordinator's {PROTOCOL_VERSION}",
            hello.protocol_version
        );
        return refuse(stream, &from, &refusal).await;
    }
    if let Err(refusal) = registry.check_data(hello.worker_id, &hello.session_token) {
        return refuse(stream, &from, &refusal).await;
    }
    if let Err(e) = data::write_frame(&mut stream, &pb::DataWelcome::default(), &[]).await {
        debug!(worker = hello.worker_id, %from, error = %e, "a data connection closed during its welcome");
        return;
    }
    // The worker may lose its place between the check and here; then the connection closes
    // and its Session is refused, which it answers by joining again.
    match registry.park_data(hello.worker_id, &hello.session_token, stream) {
        Ok(()) => debug!(worker = hello.worker_id, %from, "data connection accepted"),
        Err(refusal) => debug!(worker = hello.worker_id, %from, %refusal, "data connection dropped"),
    }
}

async fn read_hello(stream: &mut Connection) -> Result<pb::DataHello, FrameError> {
    let mut reader = FrameReader::handshake(stream);
    reader.read_magic().await?;
    match reader.read::<pb::DataHello>().await? {
        Some((hello, _)) => Ok(hello),
        None => Err(FrameError::Truncated),
    }
}

async fn refuse(mut stream: Connection, from: &str, refusal: &str) {
    warn!(%from, %refusal, "refused a data connection");
    let welcome = pb::DataWelcome {
        refusal: refusal.to_string(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), data::write_frame(&mut stream, &welcome, &[])).await;
}

/// The queue of parameter chunks towards one worker's data connection.
pub fn queue() -> (mpsc::Sender<pb::ParamsChunk>, mpsc::Receiver<pb::ParamsChunk>) {
    mpsc::channel(OUTBOUND_QUEUE)
}

/// Starts moving frames on a connected worker's data connection: gradient frames become
/// `Inbound::Message`s, and chunks put in `queue` are sent (their `values` as the payload).
/// When the trainer drops the queue's sender, the connection closes.
pub fn spawn(stream: Connection, worker: u64, events: mpsc::Sender<Inbound>, queue: mpsc::Receiver<pb::ParamsChunk>) {
    let (read, write) = tokio::io::split(stream);
    let reader = tokio::spawn(read_gradients(read, worker, events.clone()));
    tokio::spawn(async move {
        let failure = write_params(write, queue).await;
        // Either the trainer let go of the worker or the connection failed: both end the
        // connection, reading side included.
        reader.abort();
        if let Err(e) = failure {
            let reason = format!("its data connection failed while sending parameters: {e}");
            let _ = events.send(Inbound::Closed { worker, reason }).await;
        }
    });
}

async fn read_gradients(read: ReadHalf<Connection>, worker: u64, events: mpsc::Sender<Inbound>) {
    let mut frames = FrameReader::new(read, MAX_PAYLOAD);
    let reason = loop {
        match frames.read::<pb::GradientChunk>().await {
            Ok(Some((mut chunk, payload))) => {
                chunk.values = payload;
                let event = Inbound::Message {
                    worker,
                    message: pb::WorkerMessage {
                        kind: Some(pb::worker_message::Kind::Gradient(chunk)),
                    },
                    arrived: Instant::now(),
                };
                if events.send(event).await.is_err() {
                    return;
                }
            }
            Ok(None) => break "the worker closed its data connection".to_string(),
            Err(e) => break format!("its data connection failed: {e}"),
        }
    };
    debug!(worker, %reason, "data connection ended");
    let _ = events.send(Inbound::Closed { worker, reason }).await;
}

async fn write_params(
    mut write: WriteHalf<Connection>,
    mut queue: mpsc::Receiver<pb::ParamsChunk>,
) -> Result<(), FrameError> {
    while let Some(mut chunk) = queue.recv().await {
        let payload = std::mem::take(&mut chunk.values);
        data::write_frame(&mut write, &chunk, &payload).await?;
    }
    // Over TLS this says goodbye properly (close_notify).
    let _ = write.shutdown().await;
    Ok(())
}
