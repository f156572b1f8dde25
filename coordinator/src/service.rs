//! The gRPC face of the coordinator. It only moves bytes: Join and FetchShard answer from the
//! registry, and each Session stream, with the worker's data connection, is handed to the
//! trainer as channels. Workers may join at any time; the trainer admits them between steps.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

use forger_proto::PROTOCOL_VERSION;
use forger_proto::pb;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

use crate::data_link;
use crate::registry::{Connect, Registry, WorkerInfo};

/// Bytes of pixels per FetchShard chunk (whole images, at least one), well under gRPC's
/// 4 MiB message limit.
const SHARD_CHUNK_BYTES: usize = 1 << 20;
/// A Session must open with Hello within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages queued towards one worker before the trainer waits for it to read.
const OUTBOUND_QUEUE: usize = 64;
/// How long a Session waits for its worker's data connection, welcomed a moment before.
const DATA_CONNECTION_PATIENCE: Duration = Duration::from_secs(5);

/// What the service tells the trainer.
#[derive(Debug)]
pub enum Inbound {
    /// A worker opened its Session; the trainer sends to it through `outbound`, and
    /// parameter chunks through `data`, its data connection.
    Connected {
        worker: WorkerInfo,
        outbound: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
        data: mpsc::Sender<pb::ParamsChunk>,
    },
    /// A message on a worker's Session, with the time it arrived (so that a backlog the
    /// trainer has not read yet never looks like a silent worker).
    Message {
        worker: u64,
        message: pb::WorkerMessage,
        arrived: Instant,
    },
    /// A worker's Session ended; `reason` says how.
    Closed { worker: u64, reason: String },
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct CoordinatorService {
    registry: Registry,
    events: mpsc::Sender<Inbound>,
}

impl CoordinatorService {
    pub fn new(registry: Registry, events: mpsc::Sender<Inbound>) -> Self {
        CoordinatorService { registry, events }
    }
}

/// A server-streaming reply, whichever stream produces it.
pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let req = request.into_inner();
        if req.protocol_version != PROTOCOL_VERSION {
            let theirs = if req.forger_version.is_empty() {
                "an older forger".to_string()
            } else {
                format!("forger {}", req.forger_version)
            };
            return Err(Status::failed_precondition(format!(
                "this worker ({theirs}) speaks protocol version {}, the coordinator (forger {}) version \
                 {PROTOCOL_VERSION}: run the same forger release on every node",
                req.protocol_version,
                env!("CARGO_PKG_VERSION")
            )));
        }
        let host = if req.host.is_empty() { peer } else { req.host };
        let (worker, token) = self.registry.join(host, req.device, req.threads, req.replicas)?;
        info!(
            worker = worker.id,
            rank = worker.rank,
            host = %worker.host,
            device = %worker.device,
            replicas = worker.replicas,
            "worker joined"
        );
        let job = self.registry.job();
        Ok(Response::new(pb::JoinReply {
            worker_id: worker.id,
            rank: worker.rank,
            spec_toml: job.spec_toml.clone(),
            layout_fingerprint: job.fingerprint,
            session_token: token.as_bytes().to_vec().into(),
            forger_version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    type FetchShardStream = BoxStream<pb::ShardChunk>;

    async fn fetch_shard(
        &self,
        request: Request<pb::ShardRequest>,
    ) -> Result<Response<Self::FetchShardStream>, Status> {
        let pb::ShardRequest { worker_id: id, shard } = request.into_inner();
        if self.registry.worker(id).is_none() {
            return Err(Status::not_found(format!("worker {id} holds no place in the job")));
        }
        if !self.registry.may_fetch(id, shard) {
            return Err(Status::permission_denied(format!(
                "shard {shard} is not assigned to worker {id}"
            )));
        }
        let job = self.registry.job();
        let stream = async_stream_of_chunks(job, shard as usize);
        Ok(Response::new(Box::pin(stream)))
    }

    type SessionStream = BoxStream<pb::CoordinatorMessage>;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 30 s"))??;
        let Some(pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument("a Session must open with Hello"));
        };
        let (worker, data_connection) = self
            .registry
            .connect_when_ready(hello.worker_id, &hello.session_token, DATA_CONNECTION_PATIENCE)
            .await
            .map_err(|refusal| match refusal {
                Connect::NoPlace => Status::not_found(format!(
                    "worker {} holds no place in the job (never joined, or evicted)",
                    hello.worker_id
                )),
                Connect::BadToken => Status::unauthenticated(format!(
                    "the session token is not the one worker {} was given at Join",
                    hello.worker_id
                )),
                Connect::AlreadyConnected => Status::already_exists(format!(
                    "worker {} already has a session; each worker opens one",
                    hello.worker_id
                )),
                Connect::NoDataConnection => Status::failed_precondition(format!(
                    "worker {} opened no data connection before its Session (protocol: connect, send the data \
                     magic and a DataHello, wait for the welcome, then open the Session)",
                    hello.worker_id
                )),
            })?;
        let id = worker.id;
        let (outbound, receiver) = mpsc::channel(OUTBOUND_QUEUE);
        let (data, data_queue) = data_link::queue();
        self.events
            .send(Inbound::Connected { worker, outbound, data })
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        let events = self.events.clone();
        data_link::spawn(data_connection, id, events.clone(), data_queue);
        tokio::spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(pb::WorkerMessage {
                        kind: Some(pb::worker_message::Kind::Gradient(_)),
                    })) => {
                        break "it sent a gradient on its Session; gradients travel on the data connection".to_string();
                    }
                    Ok(Some(message)) => {
                        let arrived = Instant::now();
                        let event = Inbound::Message {
                            worker: id,
                            message,
                            arrived,
                        };
                        if events.send(event).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break "the worker closed its session".to_string(),
                    // Also how a worker that exits after its Shutdown looks: it drops the
                    // connection rather than closing the stream.
                    Err(status) => {
                        break format!("the connection closed without ending the stream ({})", status.message());
                    }
                }
            };
            // Routine when a run ends (a dismissed worker drops its connection, which h2 reports
            // as an error); a loss mid-run is reported by the trainer, with its step, as a warning.
            debug!(worker = id, %reason, "session ended");
            let _ = events.send(Inbound::Closed { worker: id, reason }).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// The shard of `rank`, as a stream of chunks built lazily so a large shard is never copied
/// whole into messages at once.
fn async_stream_of_chunks(
    job: std::sync::Arc<crate::registry::Job>,
    shard: usize,
) -> impl Stream<Item = Result<pb::ShardChunk, Status>> + Send + 'static {
    let shard_len = job.shards[shard].len();
    let per_chunk = (SHARD_CHUNK_BYTES / job.dataset.image_bytes()).max(1);
    let chunks = shard_len.div_ceil(per_chunk);
    futures::stream::iter(0..chunks).map(move |c| {
        let indices = &job.shards[shard][c * per_chunk..((c + 1) * per_chunk).min(shard_len)];
        let pixels = job.dataset.gather(indices);
        Ok(pb::ShardChunk {
            indices: indices.to_vec(),
            image_size: job.dataset.image_size,
            pixels: pixels.into(),
            shard_len: shard_len as u32,
            shard: shard as u32,
        })
    })
}

use futures::StreamExt as _;
