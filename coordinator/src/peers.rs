//! The trainer's side of the worker sessions: sending to a rank, and waiting for the next
//! message from any of them with a deadline that names who was late.

use std::time::Duration;

use forger_proto::pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;
use tracing::info;

use crate::error::{CoordinatorError, Result};
use crate::registry::WorkerInfo;
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
}

impl Peers {
    /// Waits until `expected` workers have opened their sessions.
    pub async fn gather(
        mut events: mpsc::Receiver<Inbound>,
        expected: usize,
        join_timeout: Duration,
        phase_timeout: Duration,
    ) -> Result<Peers> {
        let deadline = Instant::now() + join_timeout;
        let mut peers: Vec<Peer> = Vec::new();
        while peers.len() < expected {
            let event = tokio::time::timeout_at(deadline, events.recv())
                .await
                .map_err(|_| CoordinatorError::JoinTimeout {
                    joined: peers.len(),
                    expected,
                    secs: join_timeout.as_secs(),
                })?
                .ok_or_else(|| CoordinatorError::Refused("the service stopped".into()))?;
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
                    return Err(CoordinatorError::Worker {
                        worker,
                        host: String::new(),
                        step: 0,
                        phase: "join",
                        message: reason,
                    });
                }
                Inbound::Message { worker, .. } => {
                    return Err(CoordinatorError::Worker {
                        worker,
                        host: String::new(),
                        step: 0,
                        phase: "join",
                        message: "sent a message before the first step".into(),
                    });
                }
            }
        }
        peers.sort_by_key(|p| p.info.rank);
        Ok(Peers {
            peers,
            events,
            phase_timeout,
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
        let message = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Shutdown(pb::Shutdown {
                reason: reason.to_string(),
            })),
        };
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
        loop {
            let event = match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => return Err(CoordinatorError::Refused("the service stopped".into())),
                Err(_) => {
                    let rank = waiting_on.first().copied().unwrap_or(0);
                    return Err(self.fault(
                        rank,
                        step,
                        phase,
                        format!(
                            "no answer within {} s (ranks still owed: {waiting_on:?})",
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
