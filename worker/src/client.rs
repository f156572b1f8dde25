//! The worker's conversation with the coordinator: Join, download the shard, then follow the
//! coordinator's Session step by step.
//!
//! libtorch calls block, so the replica lives on its own thread ([`crate::compute`]); this
//! async side only moves messages between the gRPC stream and that thread.

use std::time::Duration;

use forger_common::layout;
use forger_common::spec::JobSpec;
use forger_proto::PROTOCOL_VERSION;
use forger_proto::pb::{self, coordinator_client::CoordinatorClient};
use tch::Device;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::compute::{self, Job, Shard};
use crate::device;
use crate::error::{Result, WorkerError};

/// How long a worker keeps trying to reach a coordinator that is not up yet.
const CONNECT_PATIENCE: Duration = Duration::from_secs(120);

/// Process settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub coordinator: String,
    pub device: Device,
    pub threads: usize,
}

/// Joins the coordinator's job and works until it says the run is over.
pub async fn run(config: WorkerConfig) -> Result<()> {
    let channel = connect(&config.coordinator).await?;
    let mut client = CoordinatorClient::new(channel);
    let host = format!("{}/{}", host_name(), std::process::id());
    let reply = client
        .join(pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            host,
            device: device::describe(config.device),
            threads: config.threads as u32,
        })
        .await?
        .into_inner();
    let spec = JobSpec::parse(&reply.spec_toml, "the coordinator's job spec")?;
    let image_size = spec.data.image_size as usize;
    let fingerprint = layout::fingerprint(&spec.model, image_size);
    if fingerprint != reply.layout_fingerprint {
        return Err(WorkerError::Protocol(format!(
            "this worker lays out the parameters differently from the coordinator (fingerprint {fingerprint:x}, coordinator {:x}): versions differ",
            reply.layout_fingerprint
        )));
    }
    info!(worker = reply.worker_id, rank = reply.rank, "joined");
    let shard = fetch_shard(&mut client, reply.worker_id, spec.data.image_size).await?;
    info!(images = shard.indices.len(), "shard received");

    let (out_tx, out_rx) = mpsc::channel::<pb::WorkerMessage>(64);
    out_tx
        .send(pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
                worker_id: reply.worker_id,
            })),
        })
        .await
        .map_err(|_| WorkerError::Protocol("the session closed before it opened".into()))?;
    let mut inbound = client.session(ReceiverStream::new(out_rx)).await?.into_inner();

    let job = Job {
        spec,
        rank: reply.rank,
        device: config.device,
    };
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<pb::CoordinatorMessage>();
    let compute_out = out_tx.clone();
    let compute = std::thread::Builder::new()
        .name("forger-compute".into())
        .spawn(move || compute::run(job, shard, cmd_rx, compute_out))
        .map_err(|e| WorkerError::Protocol(format!("failed to start the compute thread: {e}")))?;

    let stream_result: Result<()> = loop {
        match inbound.message().await {
            Ok(Some(message)) => {
                let is_shutdown = matches!(message.kind, Some(pb::coordinator_message::Kind::Shutdown(_)));
                if cmd_tx.send(message).is_err() {
                    // The compute thread ended; its own result says why.
                    break Ok(());
                }
                if is_shutdown {
                    break Ok(());
                }
            }
            Ok(None) => {
                break Err(WorkerError::Protocol(
                    "the coordinator closed the session without a shutdown".into(),
                ));
            }
            Err(status) => break Err(WorkerError::Status(status)),
        }
    };
    drop(cmd_tx);
    let compute_result = tokio::task::spawn_blocking(move || compute.join())
        .await
        .map_err(|e| WorkerError::Protocol(format!("compute thread: {e}")))?
        .map_err(|_| WorkerError::Protocol("the compute thread panicked".into()))?;
    if let Err(e) = &compute_result {
        // Tell the coordinator why before leaving, so its log names the cause.
        let _ = out_tx
            .send(pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Failure(pb::Failure {
                    step: 0,
                    phase: pb::Phase::Unspecified as i32,
                    message: e.to_string(),
                })),
            })
            .await;
    }
    // End our half of the session properly, so the coordinator sees a clean close rather than
    // a reset, and give it a moment to arrive before the process exits.
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
    compute_result?;
    stream_result
}

/// The machine's name for logs, read where Linux keeps it.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".into())
}

/// An error with its chain of causes, which tonic keeps out of its top-level message
/// ("transport error" hides "connection refused").
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Connects with exponential backoff, so workers may start before the coordinator.
async fn connect(url: &str) -> Result<Channel> {
    if url.starts_with("https://") {
        return Err(WorkerError::Protocol(format!(
            "`{url}`: TLS is not supported yet; use http:// on a trusted network"
        )));
    }
    if !url.starts_with("http://") {
        return Err(WorkerError::Protocol(format!(
            "`{url}` is not a coordinator URL: write it as http://HOST:PORT"
        )));
    }
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| WorkerError::Protocol(format!("bad coordinator address `{url}`: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) if started.elapsed() < CONNECT_PATIENCE => {
                warn!(coordinator = url, error = %with_causes(&e), retry_in_ms = delay.as_millis() as u64, "coordinator not reachable yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(WorkerError::Protocol(format!(
                    "could not reach the coordinator at {url} within {} s: {}",
                    CONNECT_PATIENCE.as_secs(),
                    with_causes(&e)
                )));
            }
        }
    }
}

async fn fetch_shard(client: &mut CoordinatorClient<Channel>, worker_id: u64, image_size: u32) -> Result<Shard> {
    let mut stream = client.fetch_shard(pb::ShardRequest { worker_id }).await?.into_inner();
    let per_image = (image_size * image_size * 3) as usize;
    let mut shard = Shard {
        image_size,
        indices: Vec::new(),
        pixels: Vec::new(),
    };
    while let Some(chunk) = stream.message().await? {
        if chunk.image_size != image_size || chunk.pixels.len() != chunk.indices.len() * per_image {
            return Err(WorkerError::Protocol(format!(
                "a shard chunk of {} images holds {} bytes at {} px, expected {} px images",
                chunk.indices.len(),
                chunk.pixels.len(),
                chunk.image_size,
                image_size
            )));
        }
        shard.indices.extend_from_slice(&chunk.indices);
        shard.pixels.extend_from_slice(&chunk.pixels);
    }
    if shard.indices.is_empty() {
        return Err(WorkerError::Protocol("the coordinator sent an empty shard".into()));
    }
    Ok(shard)
}
