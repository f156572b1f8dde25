//! The worker's conversation with the coordinator: Join, then follow the coordinator's Session
//! step by step, downloading the shards it assigns. A lost coordinator (killed, restarted, the
//! network gone) is reached again with backoff and the worker joins anew; an eviction for
//! being late is answered by joining again too. Only the end of the run, a stop request or a
//! real error ends the worker.
//!
//! libtorch calls block, so the replicas live on threads of their own, driven by the compute
//! thread ([`crate::compute`]); this async side only moves messages between the connections
//! (the gRPC Session and the data connection, put back in the coordinator's order) and that
//! thread, and sends the heartbeats.

use std::time::Duration;

use forger_common::spec::JobSpec;
use forger_common::{layout, wire};
use forger_proto::PROTOCOL_VERSION;
use forger_proto::order::InOrder;
use forger_proto::pb::{self, coordinator_client::CoordinatorClient, coordinator_message::Kind as In};
use forger_proto::tls::ClientSecurity;
use forger_proto::token::AddToken;
use tch::Device;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::compute::{self, Command, Job, Shard};
use crate::data_link::{self, Outbound};
use crate::device;
use crate::error::{Result, WorkerError};

/// Process settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub coordinator: String,
    /// One replica per device (`--devices`; `--device` is a list of one).
    pub devices: Vec<Device>,
    /// libtorch intra-op threads, shared out among the replicas.
    pub threads: usize,
    /// How long to keep trying to reach the coordinator (or a free place in its job) before
    /// giving up.
    pub patience: Duration,
    /// Leave, instead of waiting for it, when the coordinator stops the run to resume it later:
    /// for workers that belong to one coordinator process (`--local-workers`).
    pub leave_when_stopped: bool,
    /// TLS and the job token (`--credentials`), or `--insecure`.
    pub security: ClientSecurity,
}

/// The gRPC client, every call carrying the job token.
type Client = CoordinatorClient<InterceptedService<Channel, AddToken>>;

/// How a session ended without an error.
enum Ended {
    /// The run is over, or this worker was dismissed for good.
    Finished,
    /// Evicted (late or out of step), or the run stopped to be resumed (`stopped`); joining
    /// again is welcome.
    Rejoin { reason: String, stopped: bool },
    /// The compute thread stopped first; its result says why.
    ComputeStopped,
}

/// After a stop request, how long the worker waits to be dismissed at the end of the step.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(60);
/// When the data connection ends, how long the Session gets to say why (a Shutdown, say)
/// before the worker takes the coordinator for lost.
const DATA_LOSS_GRACE: Duration = Duration::from_secs(5);

/// Joins the coordinator's job and works until it says the run is over, rejoining after
/// evictions and coordinator restarts. `leave` turns true when the process is asked to stop.
pub async fn run(config: WorkerConfig, leave: watch::Receiver<bool>) -> Result<()> {
    let mut lost_since: Option<Instant> = None;
    loop {
        if *leave.borrow() {
            return Ok(());
        }
        match session(&config, leave.clone()).await {
            Ok(Ended::Finished | Ended::ComputeStopped) => return Ok(()),
            Ok(Ended::Rejoin { reason, stopped: true }) if config.leave_when_stopped => {
                info!(%reason, "the coordinator stopped the run; leaving with it (--leave-when-stopped)");
                return Ok(());
            }
            Ok(Ended::Rejoin { reason, .. }) => {
                warn!(%reason, "the coordinator let this worker go; joining again");
                lost_since = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(WorkerError::Status(status)) if status.code() == tonic::Code::OutOfRange => {
                // A coordinator started on a run that is already complete says so.
                info!(reason = %status.message(), "the coordinator has nothing left to train; leaving");
                return Ok(());
            }
            Err(e) if e.is_transient() => {
                let since = *lost_since.get_or_insert_with(Instant::now);
                if since.elapsed() > config.patience {
                    return Err(WorkerError::Protocol(format!("{e}{}", security_hint(&config.security))));
                }
                warn!(error = %e, "lost the coordinator or found no place; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// One membership of the job: Join, Session, and the steps until it ends.
async fn session(config: &WorkerConfig, mut leave: watch::Receiver<bool>) -> Result<Ended> {
    // Until the session is open there is nothing to leave cleanly: a stop request ends the
    // wait for the coordinator at once.
    let (mut client, reply) = tokio::select! {
        joined = join(config) => joined?,
        _ = leave.wait_for(|l| *l) => return Ok(Ended::Finished),
    };
    let spec = JobSpec::parse(&reply.spec_toml, "the coordinator's job spec")?;
    let image_size = spec.data.image_size as usize;
    let fingerprint = layout::fingerprint(&spec.model, image_size);
    if fingerprint != reply.layout_fingerprint {
        return Err(WorkerError::Protocol(format!(
            "this worker (forger {}) lays out the job's model differently from the coordinator (forger {}): \
             parameter layout {fingerprint:x} against {:x}; run the same forger release on every node",
            env!("CARGO_PKG_VERSION"),
            if reply.forger_version.is_empty() {
                "older"
            } else {
                &reply.forger_version
            },
            reply.layout_fingerprint
        )));
    }
    let worker_id = reply.worker_id;
    info!(worker = worker_id, rank = reply.rank, "joined");
    let data_connection =
        data_link::open(&config.coordinator, &config.security, worker_id, &reply.session_token).await?;
    // Dropped when the session ends, which closes the connection.
    let mut link = data_link::spawn(data_connection);

    let (out_tx, out_rx) = mpsc::channel::<pb::WorkerMessage>(64);
    let send = |kind| pb::WorkerMessage { kind: Some(kind) };
    let hello = pb::Hello {
        worker_id,
        session_token: reply.session_token.clone(),
    };
    out_tx
        .send(send(pb::worker_message::Kind::Hello(hello)))
        .await
        .map_err(|_| WorkerError::Protocol("the session closed before it opened".into()))?;
    let mut inbound = client.session(ReceiverStream::new(out_rx)).await?.into_inner();

    let heartbeat_every = Duration::from_secs(spec.cluster.heartbeat_secs);
    let heartbeats = {
        let out_tx = out_tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat_every);
            loop {
                tick.tick().await;
                let beat = pb::WorkerMessage {
                    kind: Some(pb::worker_message::Kind::Heartbeat(pb::Heartbeat {})),
                };
                if out_tx.send(beat).await.is_err() {
                    return;
                }
            }
        })
    };

    let job = Job {
        spec,
        devices: config.devices.clone(),
        threads: config.threads,
    };
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<Command>();
    let compute_out = Outbound {
        session: out_tx.clone(),
        data: link.send.clone(),
    };
    let compute = std::thread::Builder::new()
        .name("forger-compute".into())
        .spawn(move || {
            // It builds each shard's tensor; the replicas' threads do the parallel work.
            crate::libtorch_threads::single_threaded();
            compute::run(job, cmd_rx, compute_out)
        })
        .map_err(|e| WorkerError::Protocol(format!("failed to start the compute thread: {e}")))?;

    let mut held: Vec<u32> = Vec::new();
    let mut leave_deadline: Option<Instant> = None;
    let mut order = InOrder::new();
    // Why the data connection ended, and until when the Session may still explain it.
    let mut data_lost: Option<(String, Instant)> = None;
    let stream_result: Result<Ended> = loop {
        // Hand over, in the coordinator's order, whatever has arrived on either connection.
        if let Some(message) = order.pop() {
            let command = if let Some(In::Assign(assign)) = &message.kind {
                let shards = assign.shards.clone();
                let mut fetched = Vec::new();
                for &shard in shards.iter().filter(|s| !held.contains(s)) {
                    fetched.push(fetch_shard(&mut client, worker_id, shard, image_size as u32).await);
                }
                let fetched = match fetched.into_iter().collect::<Result<Vec<_>>>() {
                    Ok(fetched) => fetched,
                    Err(e) => break Err(e),
                };
                held.clone_from(&shards);
                Command::Shards { shards, fetched }
            } else {
                Command::Message(message)
            };
            if cmd_tx.send(command).is_err() {
                // The compute thread ended; its own result says why.
                break Ok(Ended::ComputeStopped);
            }
            continue;
        }
        let message = tokio::select! {
            message = inbound.message() => message,
            frame = link.received.recv(), if data_lost.is_none() => {
                match frame {
                    Some(Ok(chunk)) => order.push_data(chunk),
                    Some(Err(e)) => data_lost = Some((format!("the data connection failed: {e}"), Instant::now() + DATA_LOSS_GRACE)),
                    None => data_lost = Some(("the coordinator closed the data connection".into(), Instant::now() + DATA_LOSS_GRACE)),
                }
                continue;
            }
            _ = tokio::time::sleep_until(data_lost.as_ref().map_or_else(Instant::now, |(_, until)| *until)), if data_lost.is_some() => {
                let (reason, _) = data_lost.take().expect("checked above");
                break Err(WorkerError::Disconnected(reason));
            }
            _ = leave.wait_for(|l| *l), if leave_deadline.is_none() => {
                info!("asked to stop: leaving the cluster at the end of the current step");
                let reason = "the worker was asked to stop".to_string();
                let _ = out_tx.send(send(pb::worker_message::Kind::Leave(pb::Leave { reason }))).await;
                leave_deadline = Some(Instant::now() + LEAVE_TIMEOUT);
                continue;
            }
            _ = tokio::time::sleep_until(leave_deadline.unwrap_or_else(Instant::now)), if leave_deadline.is_some() => {
                warn!("the coordinator did not dismiss this worker in time; leaving anyway");
                break Ok(Ended::Finished);
            }
        };
        match message {
            Ok(Some(message)) => {
                // A Shutdown is acted on at once, whatever was sent before it.
                if let Some(In::Shutdown(shutdown)) = &message.kind {
                    let ended = if shutdown.rejoin && leave_deadline.is_none() {
                        Ended::Rejoin {
                            reason: shutdown.reason.clone(),
                            stopped: shutdown.stopped,
                        }
                    } else {
                        Ended::Finished
                    };
                    let _ = cmd_tx.send(Command::Message(message));
                    break Ok(ended);
                }
                order.push_session(message);
            }
            Ok(None) => {
                break Err(WorkerError::Disconnected(
                    "the coordinator closed the session without a shutdown".into(),
                ));
            }
            Err(status) => break Err(WorkerError::Status(status)),
        }
    };
    heartbeats.abort();
    drop(cmd_tx);
    let compute_result = tokio::task::spawn_blocking(move || compute.join())
        .await
        .map_err(|e| WorkerError::Protocol(format!("compute thread: {e}")))?
        .map_err(|_| WorkerError::Protocol("the compute thread panicked".into()))?;
    let stream_ended = stream_result?;
    let compute_result = match (compute_result, stream_ended) {
        // The session went away under a computation (an eviction while this process was
        // frozen, say): what the stream said decides; with nothing said, it is a lost
        // connection, and the worker joins again.
        (Err(WorkerError::SessionClosed), Ended::ComputeStopped) => Err(WorkerError::Disconnected(
            "the session closed while a result was being sent".into(),
        )),
        (Err(WorkerError::SessionClosed), ended) => Ok(ended),
        (Err(e), _) => Err(e),
        (Ok(()), Ended::ComputeStopped) => Ok(Ended::Finished),
        (Ok(()), ended) => Ok(ended),
    };
    if let Err(e) = &compute_result
        && !e.is_transient()
    {
        // Tell the coordinator why before leaving, so its log names the cause.
        let _ = out_tx
            .send(send(pb::worker_message::Kind::Failure(pb::Failure {
                step: 0,
                phase: pb::Phase::Unspecified as i32,
                message: e.to_string(),
            })))
            .await;
    }
    // End our half of the session properly, so the coordinator sees a clean close rather than
    // a reset, and give it a moment to arrive before the process exits.
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
    compute_result
}

/// Reaches the coordinator and joins its job.
async fn join(config: &WorkerConfig) -> Result<(Client, pb::JoinReply)> {
    let channel = connect(&config.coordinator, &config.security, config.patience).await?;
    let mut client = CoordinatorClient::with_interceptor(channel, config.security.add_token());
    let host = format!("{}/{}", host_name(), std::process::id());
    let reply = client
        .join(pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            host,
            device: device::describe_all(&config.devices),
            threads: config.threads as u32,
            replicas: config.devices.len() as u32,
            forger_version: env!("CARGO_PKG_VERSION").into(),
        })
        .await
        .map_err(|status| match status.code() {
            // A peer that does not speak HTTP/2 on this connection: the two ends disagree on TLS.
            tonic::Code::Internal if status.message().contains("h2 protocol error") => WorkerError::Protocol(format!(
                "the coordinator answered {}{}",
                status.message(),
                security_hint(&config.security)
            )),
            _ => WorkerError::Status(status),
        })?
        .into_inner();
    Ok((client, reply))
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

/// What to check when the coordinator cannot be reached: the two ends may disagree on TLS.
fn security_hint(security: &ClientSecurity) -> &'static str {
    match security {
        ClientSecurity::Insecure => {
            " (if the coordinator runs with credentials, start this worker with --credentials DIR, its folder)"
        }
        ClientSecurity::Tls(_) => {
            " (if the coordinator runs --insecure, start this worker with --insecure; otherwise check that \
             --credentials is the coordinator's folder and names the host the worker dials)"
        }
    }
}

/// Connects with exponential backoff, so workers may start before the coordinator (or
/// outlive a restart of it).
async fn connect(url: &str, security: &ClientSecurity, patience: Duration) -> Result<Channel> {
    let (address, _) = data_link::host_and_port(url)?;
    let endpoint = security
        .endpoint(&address)
        .map_err(|e| WorkerError::Protocol(format!("bad coordinator address `{url}`: {e}")))?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(wire::STREAM_WINDOW))
        .initial_connection_window_size(Some(wire::CONNECTION_WINDOW))
        .max_frame_size(Some(wire::MAX_FRAME))
        .connect_timeout(Duration::from_secs(5))
        // A coordinator host that vanishes without closing the connection is noticed within
        // seconds rather than when the kernel gives up on the socket.
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) if started.elapsed() < patience => {
                warn!(coordinator = url, error = %with_causes(&e), retry_in_ms = delay.as_millis() as u64, "coordinator not reachable yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(WorkerError::Protocol(format!(
                    "could not reach the coordinator at {url} within {} s: {}{}",
                    patience.as_secs(),
                    with_causes(&e),
                    security_hint(security)
                )));
            }
        }
    }
}

async fn fetch_shard(client: &mut Client, worker_id: u64, shard: u32, image_size: u32) -> Result<Shard> {
    let mut stream = client
        .fetch_shard(pb::ShardRequest { worker_id, shard })
        .await?
        .into_inner();
    let per_image = (image_size * image_size * 3) as usize;
    let mut data = Shard {
        shard,
        image_size,
        indices: Vec::new(),
        pixels: Vec::new(),
    };
    while let Some(chunk) = stream.message().await? {
        if chunk.shard != shard
            || chunk.image_size != image_size
            || chunk.pixels.len() != chunk.indices.len() * per_image
        {
            return Err(WorkerError::Protocol(format!(
                "a chunk of shard {} with {} images holds {} bytes at {} px, expected shard {shard} with {} px images",
                chunk.shard,
                chunk.indices.len(),
                chunk.pixels.len(),
                chunk.image_size,
                image_size
            )));
        }
        data.indices.extend_from_slice(&chunk.indices);
        data.pixels.extend_from_slice(&chunk.pixels);
    }
    if data.indices.is_empty() {
        return Err(WorkerError::Protocol(format!(
            "the coordinator sent shard {shard} empty"
        )));
    }
    info!(shard, images = data.indices.len(), "shard received");
    Ok(data)
}
