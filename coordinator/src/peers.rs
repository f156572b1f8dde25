//! The trainer's side of the worker sessions: sending to a rank, and waiting for the next
//! message from any of them with a deadline that names who was late.

use std::time::Duration;

use forger_proto::pb;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::Status;
use tracing::{info, warn};

use crate::error::{CoordinatorError, Result};
use crate::registry::{Registry, WorkerInfo};
use crate::service::Inbound;

/// One connected worker.
#[derive(Debug)]
struct Peer {
    info: WorkerInfo,
    outbound: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
}

/// All workers of the run, indexed by rank.
#[derive(Debug)]
pub struct Peers {
    peers: Vec<Peer>,
    events: mpsc::Receiver<Inbound>,
    phase_timeout: Duration,
    stop: watch::Receiver<bool>,
}

/// After a stop request, how long a step in flight may take before it is abandoned (and
/// undone), so that a hung worker cannot hold a Ctrl-C for the whole phase timeout.
const STOP_GRACE: Duration = Duration::from_secs(10);

impl Peers {
    /// Waits until `expected` workers have opened their sessions. A worker that leaves while
    /// waiting gives its place back to the next one to join; a stop request ends the wait.
    pub async fn gather(
        mut events: mpsc::Receiver<Inbound>,
        registry: Registry,
        join_timeout: Duration,
        phase_timeout: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Peers> {
        let expected = registry.job().expected_workers;
        let deadline = Instant::now() + join_timeout;
        let mut peers: Vec<Peer> = Vec::new();
        let dismiss = |peers: &[Peer], reason: &str| {
            let message = shutdown_message(reason);
            for peer in peers {
                let _ = peer.outbound.try_send(Ok(message.clone()));
            }
        };
        while peers.len() < expected {
            let event = tokio::select! {
                event = tokio::time::timeout_at(deadline, events.recv()) => event,
                _ = stop.wait_for(|stop| *stop) => {
                    dismiss(&peers, "the coordinator was stopped before training began");
                    return Err(CoordinatorError::Interrupted { step: 0 });
                }
            };
            let Ok(event) = event else {
                let error = CoordinatorError::JoinTimeout {
                    joined: peers.len(),
                    expected,
                    secs: join_timeout.as_secs(),
                };
                dismiss(&peers, &error.to_string());
                return Err(error);
            };
            let event = event.ok_or_else(|| CoordinatorError::Refused("the service stopped".into()))?;
            match event {
                Inbound::Connected { worker, outbound } => {
                    info!(
                        worker = worker.id,
                        rank = worker.rank,
                        connected = peers.len() + 1,
                        expected,
                        "worker ready"
                    );
                    peers.push(Peer { info: worker, outbound });
                }
                Inbound::Closed { worker, reason } => {
                    peers.retain(|p| p.info.id != worker);
                    registry.release(worker);
                    warn!(worker, %reason, "a worker left before training began; waiting for another");
                }
                Inbound::Message { worker, .. } => {
                    peers.retain(|p| p.info.id != worker);
                    registry.release(worker);
                    warn!(worker, "a worker sent a message before the first step; dropped it");
                }
            }
        }
        peers.sort_by_key(|p| p.info.rank);
        Ok(Peers {
            peers,
            events,
            phase_timeout,
            stop,
        })
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn info(&self, rank: usize) -> &WorkerInfo {
        &self.peers[rank].info
    }

    /// An error about the worker at `rank`.
    pub fn fault(&self, rank: usize, step: u64, phase: &'static str, message: impl Into<String>) -> CoordinatorError {
        let info = &self.peers[rank].info;
        CoordinatorError::Worker {
            worker: info.id,
            host: info.host.clone(),
            step,
            phase,
            message: message.into(),
        }
    }

    fn rank_of(&self, worker: u64) -> Option<usize> {
        self.peers.iter().position(|p| p.info.id == worker)
    }

    /// Sends to one rank.
    pub async fn send(
        &self,
        rank: usize,
        message: pb::CoordinatorMessage,
        step: u64,
        phase: &'static str,
    ) -> Result<()> {
        self.peers[rank]
            .outbound
            .send(Ok(message))
            .await
            .map_err(|_| self.fault(rank, step, phase, "its session is closed"))
    }

    /// Sends the same messages to every rank, in order.
    pub async fn broadcast(&self, messages: &[pb::CoordinatorMessage], step: u64, phase: &'static str) -> Result<()> {
        for rank in 0..self.peers.len() {
            for message in messages {
                self.send(rank, message.clone(), step, phase).await?;
            }
        }
        Ok(())
    }

    /// Tells every worker to leave; a worker that is already gone is not an error here.
    pub async fn shutdown(&self, reason: &str) {
        let message = shutdown_message(reason);
        for peer in &self.peers {
            let _ = peer.outbound.send(Ok(message.clone())).await;
        }
    }

    /// A deadline for one phase starting now.
    pub fn phase_deadline(&self) -> Instant {
        Instant::now() + self.phase_timeout
    }

    /// The next message from any worker of this run, as `(rank, kind)`. A closed session,
    /// a reported failure, or silence past `deadline` becomes an error naming the worker.
    /// `waiting_on` lists the ranks still owed a message, to name them on a timeout.
    pub async fn next(
        &mut self,
        deadline: Instant,
        step: u64,
        phase: &'static str,
        waiting_on: &[usize],
    ) -> Result<(usize, pb::worker_message::Kind)> {
        let mut deadline = deadline;
        let mut stopping = *self.stop.borrow();
        if stopping {
            deadline = deadline.min(Instant::now() + STOP_GRACE);
        }
        loop {
            let received = tokio::select! {
                received = tokio::time::timeout_at(deadline, self.events.recv()) => received,
                _ = self.stop.wait_for(|stop| *stop), if !stopping => {
                    stopping = true;
                    deadline = deadline.min(Instant::now() + STOP_GRACE);
                    continue;
                }
            };
            let event = match received {
                Ok(Some(event)) => event,
                Ok(None) => return Err(CoordinatorError::Refused("the service stopped".into())),
                Err(_) if stopping => {
                    warn!(
                        step,
                        phase,
                        ?waiting_on,
                        "abandoning the step: stop requested and workers are late"
                    );
                    return Err(CoordinatorError::Interrupted { step });
                }
                Err(_) => {
                    let rank = waiting_on.first().copied().unwrap_or(0);
                    let owed: Vec<u64> = waiting_on.iter().map(|&r| self.peers[r].info.id).collect();
                    return Err(self.fault(
                        rank,
                        step,
                        phase,
                        format!(
                            "no answer within {} s (workers still owed: {owed:?})",
                            self.phase_timeout.as_secs()
                        ),
                    ));
                }
            };
            match event {
                Inbound::Message { worker, message } => {
                    let Some(rank) = self.rank_of(worker) else { continue };
                    match message.kind {
                        Some(pb::worker_message::Kind::Failure(failure)) => {
                            return Err(self.fault(rank, step, phase, format!("reported: {}", failure.message)));
                        }
                        Some(kind) => return Ok((rank, kind)),
                        None => return Err(self.fault(rank, step, phase, "sent an empty message")),
                    }
                }
                Inbound::Closed { worker, reason } => {
                    if let Some(rank) = self.rank_of(worker) {
                        return Err(self.fault(rank, step, phase, format!("lost: {reason}")));
                    }
                }
                Inbound::Connected { worker, outbound } => {
                    // The cluster is fixed once training starts; tell the newcomer so.
                    let _ = outbound
                        .send(Err(Status::failed_precondition("the run has already started")))
                        .await;
                    info!(worker = worker.id, "refused a session after the start");
                }
            }
        }
    }
}

fn shutdown_message(reason: &str) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage {
        kind: Some(pb::coordinator_message::Kind::Shutdown(pb::Shutdown {
            reason: reason.to_string(),
        })),
    }
}
