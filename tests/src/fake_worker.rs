//! A worker that speaks forger's protocol without libtorch: it answers with losses and
//! gradients the test chooses, and records what the coordinator sent.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use forger_common::average::weighted_average;
use forger_common::compression::{ErrorFeedback, GradientCompression};
use forger_common::layout;
use forger_common::spec::JobSpec;
use forger_common::wire::{self, CHUNK_VALUES};
use forger_proto::PROTOCOL_VERSION;
use forger_proto::connection::Connection;
use forger_proto::data::{self, FrameLink};
use forger_proto::order::InOrder;
use forger_proto::pb::{
    self, coordinator_client::CoordinatorClient, coordinator_message::Kind as In, worker_message::Kind as Out,
};
use forger_proto::tls::ClientSecurity;
use forger_proto::token::AddToken;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Every await in a test is bounded by this.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A joined fake worker with an open session, sending heartbeats until told to stop.
#[derive(Debug)]
pub struct FakeWorker {
    pub id: u64,
    pub rank: u32,
    /// The replicas it said it runs at Join.
    pub replicas: u32,
    pub spec: JobSpec,
    /// The shards it holds, each with its dataset indices.
    pub shards: BTreeMap<u32, Vec<u32>>,
    /// From the Join reply; a test may show it on a connection of its own.
    pub token: Bytes,
    client: CoordinatorClient<InterceptedService<Channel, AddToken>>,
    outbound: mpsc::Sender<pb::WorkerMessage>,
    inbound: Streaming<pb::CoordinatorMessage>,
    /// The data connection: gradients up, parameters down.
    link: FrameLink<pb::GradientChunk, pb::ParamsChunk>,
    data_ended: bool,
    order: InOrder,
    heartbeats: JoinHandle<()>,
    /// With bf16 gradients: each (shard, phase)'s error-feedback residual.
    residuals: Mutex<HashMap<(u32, i32), ErrorFeedback>>,
    /// With bf16 gradients: each phase's group, with its residual.
    group_residuals: Mutex<HashMap<i32, (Vec<u32>, ErrorFeedback)>>,
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

impl FakeWorker {
    /// Joins and opens the session; shards come with [`FakeWorker::take_assignment`].
    pub async fn join(url: &str) -> FakeWorker {
        FakeWorker::join_with_replicas(url, 1).await
    }

    /// Joins saying it runs `replicas` replicas, as `forger-worker --devices` does: it is
    /// given shards in proportion and, with more than one, must upload a group per phase
    /// ([`FakeWorker::upload_group`]).
    pub async fn join_with_replicas(url: &str, replicas: u32) -> FakeWorker {
        FakeWorker::join_secured(url, &ClientSecurity::Insecure, replicas).await
    }

    /// Joins over TLS with the job token (or not, with `ClientSecurity::Insecure`).
    pub async fn join_secured(url: &str, security: &ClientSecurity, replicas: u32) -> FakeWorker {
        let address = address_of(url);
        let channel = security
            .endpoint(address)
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut client = CoordinatorClient::with_interceptor(channel, security.add_token());
        let reply = client
            .join(pb::JoinRequest {
                protocol_version: PROTOCOL_VERSION,
                host: "fake".into(),
                device: "none".into(),
                threads: 1,
                replicas,
                forger_version: env!("CARGO_PKG_VERSION").into(),
            })
            .await
            .expect("join")
            .into_inner();
        let spec = JobSpec::parse(&reply.spec_toml, "join reply").expect("spec from the coordinator");
        let stream = open_data_connection_secured(url, security, reply.worker_id, &reply.session_token)
            .await
            .expect("data connection accepted");
        let link = FrameLink::spawn(stream, CHUNK_VALUES * 4);
        let (outbound, rx) = mpsc::channel(64);
        outbound
            .send(pb::WorkerMessage {
                kind: Some(Out::Hello(pb::Hello {
                    worker_id: reply.worker_id,
                    session_token: reply.session_token.clone(),
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
            replicas: replicas.max(1),
            spec,
            shards: BTreeMap::new(),
            token: reply.session_token,
            client,
            outbound,
            inbound,
            link,
            data_ended: false,
            order: InOrder::new(),
            heartbeats,
            residuals: Mutex::new(HashMap::new()),
            group_residuals: Mutex::new(HashMap::new()),
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

    /// The next message from the coordinator, from either connection in the order it was
    /// sent; a Shutdown at once, as a worker acts on it.
    pub async fn recv(&mut self) -> In {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(message) = self.order.pop() {
                return message.kind.expect("message has a kind");
            }
            let arrived = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    message = self.inbound.message() => {
                        Arrived::Session(message.expect("session failed").expect("session ended"))
                    }
                    frame = self.link.received.recv(), if !self.data_ended => match frame {
                        Some(frame) => Arrived::Data(frame.expect("data connection failed")),
                        // The coordinator closes it as it lets the worker go; the Session
                        // says why.
                        None => Arrived::DataEnded,
                    }
                }
            })
            .await
            .expect("the coordinator went silent");
            match arrived {
                Arrived::Session(message) if matches!(message.kind, Some(In::Shutdown(_))) => {
                    return message.kind.expect("checked");
                }
                Arrived::Session(message) => self.order.push_session(message),
                Arrived::Data(chunk) => self.order.push_data(chunk),
                Arrived::DataEnded => self.data_ended = true,
            }
        }
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

    /// Sends on the Session (where a gradient does not belong: [`FakeWorker::upload`] sends
    /// those on the data connection).
    pub async fn send(&self, kind: Out) {
        self.outbound
            .send(pb::WorkerMessage { kind: Some(kind) })
            .await
            .expect("session open");
    }

    /// Uploads one shard's `gradient` for a phase in wire-sized chunks.
    pub async fn upload(
        &self,
        at: (u64, u32),
        phase: pb::Phase,
        shard: u32,
        gradient: &[f32],
        samples: u32,
        bn_stats: Vec<f32>,
    ) {
        let encoded = match self.spec.cluster.gradient_compression {
            GradientCompression::None => wire::f32_bytes(gradient),
            // The residual is kept per shard and phase across steps, so the work per step is
            // a real worker's.
            GradientCompression::Bf16 => {
                let mut residuals = self.residuals.lock().expect("residuals lock");
                let feedback = residuals
                    .entry((shard, phase as i32))
                    .or_insert_with(|| ErrorFeedback::new(gradient.len()));
                Bytes::from(feedback.compress(at.0, gradient))
            }
        };
        self.upload_encoded(at, phase, shard, encoded, samples, bn_stats).await;
    }

    /// Uploads a gradient already in wire bytes (of the job's encoding), sliced into chunks
    /// as a real worker slices its encoded gradient.
    pub async fn upload_encoded(
        &self,
        at: (u64, u32),
        phase: pb::Phase,
        shard: u32,
        encoded: Bytes,
        samples: u32,
        bn_stats: Vec<f32>,
    ) {
        let mut bn_stats = Some(bn_stats);
        self.send_chunks(at, phase, shard, encoded, |chunk, _, last| {
            if last {
                chunk.samples = samples;
                chunk.bn_batch_stats = bn_stats.take().unwrap();
            }
        })
        .await;
    }

    /// Slices `encoded` into chunks as a real worker slices its encoded gradient; `ends` adds
    /// what the first and the last chunk carry beside the values.
    async fn send_chunks(
        &self,
        (step, attempt): (u64, u32),
        phase: pb::Phase,
        shard: u32,
        encoded: Bytes,
        mut ends: impl FnMut(&mut pb::GradientChunk, bool, bool),
    ) {
        let value_bytes = self.spec.cluster.gradient_compression.value_bytes();
        let len = encoded.len() / value_bytes;
        let chunks = len.div_ceil(CHUNK_VALUES);
        for c in 0..chunks {
            let range = c * CHUNK_VALUES..((c + 1) * CHUNK_VALUES).min(len);
            let last = c + 1 == chunks;
            let mut chunk = pb::GradientChunk {
                step,
                attempt,
                phase: phase as i32,
                shard,
                offset: range.start as u64,
                values: encoded.slice(range.start * value_bytes..range.end * value_bytes),
                last,
                ..Default::default()
            };
            ends(&mut chunk, c == 0, last);
            self.link.send.send(chunk).await.expect("data connection open");
        }
    }

    /// Uploads one gradient for several shards, as a worker with several replicas does: the
    /// sample-weighted mean of `parts` (shard, gradient, samples, batch-norm statistics), in
    /// the order given, with bf16 error feedback per group when the job compresses.
    pub async fn upload_group(&self, at: (u64, u32), phase: pb::Phase, parts: &[(u32, &[f32], u32, Vec<f32>)]) {
        let weighted: Vec<(&[f32], u32)> = parts.iter().map(|&(_, g, n, _)| (g, n)).collect();
        let mut sum = vec![0f32; parts[0].1.len()];
        weighted_average(&weighted, &mut sum);
        let shards: Vec<u32> = parts.iter().map(|p| p.0).collect();
        let encoded = match self.spec.cluster.gradient_compression {
            GradientCompression::None => wire::f32_bytes(&sum),
            GradientCompression::Bf16 => {
                let mut groups = self.group_residuals.lock().expect("residuals lock");
                let (members, feedback) = groups
                    .entry(phase as i32)
                    .or_insert_with(|| (shards.clone(), ErrorFeedback::new(sum.len())));
                if *members != shards {
                    *members = shards.clone();
                    *feedback = ErrorFeedback::new(sum.len());
                }
                Bytes::from(feedback.compress(at.0, &sum))
            }
        };
        let group = parts
            .iter()
            .map(|(shard, gradient, samples, bn)| pb::GroupShard {
                shard: *shard,
                samples: *samples,
                bn_batch_stats: bn.clone(),
                non_finite: !gradient.iter().all(|v| v.is_finite()),
            })
            .collect();
        self.upload_group_encoded(at, phase, group, encoded).await;
    }

    /// Uploads a group's gradient already in wire bytes, `group` listing its shards on the
    /// first chunk as it is, however wrong; the group's first listed shard names the upload.
    pub async fn upload_group_encoded(
        &self,
        at: (u64, u32),
        phase: pb::Phase,
        group: Vec<pb::GroupShard>,
        encoded: Bytes,
    ) {
        let (shard, total) = (group[0].shard, group.iter().map(|g| g.samples).sum::<u32>());
        let mut group = Some(group);
        self.send_chunks(at, phase, shard, encoded, |chunk, first, last| {
            if first {
                chunk.group = group.take().unwrap_or_default();
            }
            if last {
                chunk.samples = total;
            }
        })
        .await;
    }

    /// Sends one frame on the data connection as it is, however wrong.
    pub async fn send_frame(&self, chunk: pb::GradientChunk) {
        self.link.send.send(chunk).await.expect("data connection open");
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

/// What [`FakeWorker::recv`] took off one of the connections.
enum Arrived {
    Session(pb::CoordinatorMessage),
    Data(pb::ParamsChunk),
    DataEnded,
}

/// Opens a data connection to the coordinator at `url` (`http://host:port`) as worker `id`
/// with `token`, returning the refusal or failure as text.
pub async fn open_data_connection(url: &str, id: u64, token: &[u8]) -> Result<Connection, String> {
    open_data_connection_secured(url, &ClientSecurity::Insecure, id, token).await
}

/// [`open_data_connection`] with the given security.
pub async fn open_data_connection_secured(
    url: &str,
    security: &ClientSecurity,
    id: u64,
    token: &[u8],
) -> Result<Connection, String> {
    let address = address_of(url);
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    let hello = pb::DataHello {
        protocol_version: PROTOCOL_VERSION,
        worker_id: id,
        session_token: Bytes::copy_from_slice(token),
    };
    data::connect(address, host, security, &hello)
        .await
        .map_err(|e| e.to_string())
}

/// `host:port` of a test's `http://host:port` URL.
fn address_of(url: &str) -> &str {
    url.strip_prefix("http://").unwrap_or(url).trim_end_matches('/')
}
