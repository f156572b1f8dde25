//! A worker that speaks forger's protocol without libtorch: it answers with losses and
//! gradients the test chooses, and records what the coordinator sent.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use forger_common::compression::{ErrorFeedback, GradientCompression};
use forger_common::layout;
use forger_common::spec::JobSpec;
use forger_common::wire::{self, CHUNK_VALUES};
use forger_proto::PROTOCOL_VERSION;
use forger_proto::pb::{
    self, coordinator_client::CoordinatorClient, coordinator_message::Kind as In, worker_message::Kind as Out,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

/// Every await in a test is bounded by this.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A joined fake worker with an open session, sending heartbeats until told to stop.
#[derive(Debug)]
pub struct FakeWorker {
    pub id: u64,
    pub rank: u32,
    pub spec: JobSpec,
    /// The shards it holds, each with its dataset indices.
    pub shards: BTreeMap<u32, Vec<u32>>,
    client: CoordinatorClient<Channel>,
    outbound: mpsc::Sender<pb::WorkerMessage>,
    inbound: Streaming<pb::CoordinatorMessage>,
    heartbeats: JoinHandle<()>,
    /// With bf16 gradients: each (shard, phase)'s error-feedback residual.
    residuals: Mutex<HashMap<(u32, i32), ErrorFeedback>>,
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

impl FakeWorker {
    /// Joins and opens the session; shards come with [`FakeWorker::take_assignment`].
    pub async fn join(url: &str) -> FakeWorker {
        let mut client = CoordinatorClient::connect(url.to_string()).await.expect("connect");
        let reply = client
            .join(pb::JoinRequest {
                protocol_version: PROTOCOL_VERSION,
                host: "fake".into(),
                device: "none".into(),
                threads: 1,
            })
            .await
            .expect("join")
            .into_inner();
        let spec = JobSpec::parse(&reply.spec_toml, "join reply").expect("spec from the coordinator");
        let (outbound, rx) = mpsc::channel(64);
        outbound
            .send(pb::WorkerMessage {
                kind: Some(Out::Hello(pb::Hello {
                    worker_id: reply.worker_id,
                })),
            })
            .await
            .unwrap();
        let inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .expect("session")
            .into_inner();
        let beat = outbound.clone();
        let every = Duration::from_secs(spec.cluster.heartbeat_secs);
        let heartbeats = tokio::spawn(async move {
            loop {
                let message = pb::WorkerMessage {
                    kind: Some(Out::Heartbeat(pb::Heartbeat {})),
                };
                if beat.send(message).await.is_err() {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        });
        FakeWorker {
            id: reply.worker_id,
            rank: reply.rank,
            spec,
            shards: BTreeMap::new(),
            client,
            outbound,
            inbound,
            heartbeats,
            residuals: Mutex::new(HashMap::new()),
        }
    }

    /// Goes silent, as a hung process would.
    pub fn stop_heartbeats(&self) {
        self.heartbeats.abort();
    }

    /// Receives an Assign, downloads the shards it lacks, drops the others and answers Ready.
    pub async fn take_assignment(&mut self) -> Vec<u32> {
        let In::Assign(assign) = self.recv().await else {
            panic!("expected Assign")
        };
        self.shards.retain(|shard, _| assign.shards.contains(shard));
        for &shard in &assign.shards {
            if self.shards.contains_key(&shard) {
                continue;
            }
            let mut stream = self
                .client
                .fetch_shard(pb::ShardRequest {
                    worker_id: self.id,
                    shard,
                })
                .await
                .expect("fetch shard")
                .into_inner();
            let mut indices = Vec::new();
            while let Some(chunk) = stream.message().await.expect("shard chunk") {
                assert_eq!(chunk.shard, shard);
                indices.extend(chunk.indices);
            }
            self.shards.insert(shard, indices);
        }
        self.send(Out::Ready(pb::Ready {
            shards: assign.shards.clone(),
        }))
        .await;
        assign.shards
    }

    /// The next message from the coordinator.
    pub async fn recv(&mut self) -> In {
        let message = tokio::time::timeout(TIMEOUT, self.inbound.message())
            .await
            .expect("the coordinator went silent")
            .expect("session failed")
            .expect("session ended");
        message.kind.expect("message has a kind")
    }

    /// Receives a whole parameter download: `(network, values, batch-norm running stats)`.
    pub async fn recv_params(&mut self) -> (pb::Network, u64, Vec<f32>, Vec<f32>) {
        let mut values = Vec::new();
        loop {
            let chunk = match self.recv().await {
                In::Params(chunk) => chunk,
                other => panic!("expected parameters, got {other:?}"),
            };
            assert_eq!(chunk.offset as usize, values.len(), "parameter chunks arrive in order");
            let mut part = vec![0f32; chunk.values.len() / 4];
            assert!(wire::le_bytes_to_f32(&chunk.values, &mut part));
            values.extend(part);
            if chunk.last {
                return (chunk.network(), chunk.step, values, chunk.bn_running_stats);
            }
        }
    }

    pub async fn send(&self, kind: Out) {
        self.outbound
            .send(pb::WorkerMessage { kind: Some(kind) })
            .await
            .expect("session open");
    }

    /// Uploads one shard's `gradient` for a phase in wire-sized chunks.
    pub async fn upload(
        &self,
        (step, attempt): (u64, u32),
        phase: pb::Phase,
        shard: u32,
        gradient: &[f32],
        samples: u32,
        bn_stats: Vec<f32>,
    ) {
        let chunks = gradient.len().div_ceil(CHUNK_VALUES);
        let compression = self.spec.cluster.gradient_compression;
        // Encoded whole, then sliced, as a real worker does; with bf16 the residual is kept
        // per shard and phase across steps, so the work per step is a real worker's too.
        let encoded = match compression {
            GradientCompression::None => wire::f32_bytes(gradient),
            GradientCompression::Bf16 => {
                let mut residuals = self.residuals.lock().expect("residuals lock");
                let feedback = residuals
                    .entry((shard, phase as i32))
                    .or_insert_with(|| ErrorFeedback::new(gradient.len()));
                Bytes::from(feedback.compress(step, gradient))
            }
        };
        let value_bytes = compression.value_bytes();
        let mut bn_stats = Some(bn_stats);
        for c in 0..chunks {
            let range = c * CHUNK_VALUES..((c + 1) * CHUNK_VALUES).min(gradient.len());
            let last = c + 1 == chunks;
            let bytes = encoded.slice(range.start * value_bytes..range.end * value_bytes);
            self.send(Out::Gradient(pb::GradientChunk {
                step,
                attempt,
                phase: phase as i32,
                shard,
                offset: range.start as u64,
                values: bytes,
                last,
                samples: if last { samples } else { 0 },
                bn_batch_stats: if last { bn_stats.take().unwrap() } else { Vec::new() },
            }))
            .await;
        }
    }

    pub fn d_len(&self) -> usize {
        layout::discriminator_layout(&self.spec.model, self.spec.data.image_size as usize).numel()
    }

    pub fn g_len(&self) -> usize {
        layout::generator_layout(&self.spec.model).numel()
    }

    pub fn bn_len(&self) -> usize {
        layout::batch_norm_stats_len(&self.spec.model)
    }
}
