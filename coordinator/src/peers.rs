//! The trainer's side of the worker sessions: who is connected and which shards each holds,
//! sending with a deadline, and waiting for the next message from any of them while watching
//! every worker's heartbeat.
//!
//! A worker's session may open at any time; it becomes a peer at once, but takes part in
//! training only after the trainer has assigned it shards between two steps.

use std::sync::atomic::{AtomicU64, Ordering};
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
pub struct Peer {
    pub info: WorkerInfo,
    outbound: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
    /// Parameter chunks go on the data connection, the rest on the Session; each is stamped
    /// with how many of the other kind went before it (`forger_proto::order`).
    data: mpsc::Sender<pb::ParamsChunk>,
    session_sent: AtomicU64,
    data_sent: AtomicU64,
    /// The shards whose data the worker holds; empty until it is admitted.
    pub shards: Vec<u32>,
    /// Shards it was told to hold and has not yet confirmed with a Ready.
    pub assigning: Option<Vec<u32>>,
    /// Whether the worker's replica holds the master parameters of the current step.
    pub has_params: bool,
    /// The worker asked to leave; it is dismissed at the next step boundary.
    pub leaving: bool,
    /// Steps it has completed; its first is slow (a device's kernels load on first use), so
    /// the stall deadline waits until every worker has one behind it.
    pub steps_done: u64,
    last_seen: Instant,
}

impl Peer {
    /// When the worker was last heard from (any message, heartbeats included).
    pub fn last_seen(&self) -> Instant {
        self.last_seen
    }

    /// Whether the worker computes for the step in flight.
    pub fn trains(&self) -> bool {
        !self.shards.is_empty()
    }

    /// Puts `message` on the channel it travels by; `Err` when that channel is closed. A send
    /// abandoned half-way (a deadline) counts nothing, so the stamps stay true.
    async fn deliver(&self, message: pb::CoordinatorMessage) -> std::result::Result<(), ()> {
        match message.kind {
            Some(pb::coordinator_message::Kind::Params(mut chunk)) => {
                chunk.session_messages_before = self.session_sent.load(Ordering::Relaxed);
                self.data.send(chunk).await.map_err(|_| ())?;
                self.data_sent.fetch_add(1, Ordering::Relaxed);
            }
            kind => {
                let message = pb::CoordinatorMessage {
                    data_frames_before: self.data_sent.load(Ordering::Relaxed),
                    kind,
                };
                self.outbound.send(Ok(message)).await.map_err(|_| ())?;
                self.session_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Sends a Shutdown without waiting; a worker acts on it at once, whatever came before.
    fn try_shutdown(&self, reason: &str, rejoin: bool) {
        let mut message = shutdown_message(reason, rejoin, false);
        message.data_frames_before = self.data_sent.load(Ordering::Relaxed);
        if self.outbound.try_send(Ok(message)).is_ok() {
            self.session_sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What ended a [`Peers::wait`].
#[derive(Debug)]
pub enum Event {
    /// A message from a peer (heartbeats and leave requests are handled inside).
    Message(u64, pb::worker_message::Kind),
    /// A worker connected, left or was evicted while idle.
    Membership,
    /// The shutdown signal arrived (reported once).
    Stopped,
    /// The wait reached its deadline.
    Timeout,
}

/// All sessions of the run, in rank order.
#[derive(Debug)]
pub struct Peers {
    peers: Vec<Peer>,
    events: mpsc::Receiver<Inbound>,
    registry: Registry,
    heartbeat_timeout: Duration,
    stop: watch::Receiver<bool>,
    stopping: bool,
    /// Workers removed here before they trained (left, failed or fell silent), for the
    /// trainer to record: `(worker, host, reason)`.
    departures: Vec<(u64, String, String)>,
}

/// After a stop request, how long a step in flight may take before it is abandoned (and
/// undone), so that a hung worker cannot hold a Ctrl-C for the whole phase timeout.
const STOP_GRACE: Duration = Duration::from_secs(10);

impl Peers {
    pub fn new(
        events: mpsc::Receiver<Inbound>,
        registry: Registry,
        heartbeat_timeout: Duration,
        stop: watch::Receiver<bool>,
    ) -> Peers {
        Peers {
            peers: Vec::new(),
            events,
            registry,
            heartbeat_timeout,
            stop,
            stopping: false,
            departures: Vec::new(),
        }
    }

    /// Workers removed before they trained since the last call.
    pub fn take_departures(&mut self) -> Vec<(u64, String, String)> {
        std::mem::take(&mut self.departures)
    }

    /// Removes a worker that was not training yet, noting why.
    fn depart(&mut self, worker: u64, reason: String, rejoin: bool) {
        let host = self.get(worker).map(|p| p.info.host.clone()).unwrap_or_default();
        if self.evict(worker, &reason, rejoin) {
            self.departures.push((worker, host, reason));
        }
    }

    /// Every connected worker, in rank order.
    pub fn all(&self) -> &[Peer] {
        &self.peers
    }

    pub fn all_mut(&mut self) -> &mut [Peer] {
        &mut self.peers
    }

    /// The replicas of every connected worker: what `cluster.workers` and `min_workers` count.
    pub fn replicas(&self) -> usize {
        self.peers.iter().map(|p| p.info.replicas as usize).sum()
    }

    /// Workers taking part in training (holding shards), in rank order.
    pub fn training(&self) -> impl Iterator<Item = &Peer> {
        self.peers.iter().filter(|p| p.trains())
    }

    pub fn get(&self, worker: u64) -> Option<&Peer> {
        self.peers.iter().find(|p| p.info.id == worker)
    }

    pub fn get_mut(&mut self, worker: u64) -> Option<&mut Peer> {
        self.peers.iter_mut().find(|p| p.info.id == worker)
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Whether the shutdown signal has been seen.
    pub fn stopping(&self) -> bool {
        self.stopping || *self.stop.borrow()
    }

    /// An error about one worker, to be answered by evicting it.
    pub fn fault(&self, worker: u64, step: u64, phase: &'static str, message: impl Into<String>) -> CoordinatorError {
        let host = self
            .get(worker)
            .map_or_else(|| "gone".to_string(), |p| p.info.host.clone());
        CoordinatorError::Worker {
            worker,
            host,
            step,
            phase,
            message: message.into(),
        }
    }

    /// Sends to one worker; a worker that has not made room by `deadline` (it stopped reading)
    /// is at fault.
    pub async fn send(
        &self,
        worker: u64,
        message: pb::CoordinatorMessage,
        deadline: Instant,
        step: u64,
        phase: &'static str,
    ) -> Result<()> {
        let Some(peer) = self.get(worker) else {
            return Err(self.fault(worker, step, phase, "it is no longer connected"));
        };
        match tokio::time::timeout_at(deadline, peer.deliver(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(self.fault(worker, step, phase, "its session is closed")),
            Err(_) => Err(self.fault(worker, step, phase, "it stopped reading its messages")),
        }
    }

    /// Sends the same messages to each of `workers`, in order.
    pub async fn send_all(
        &self,
        workers: &[u64],
        messages: &[pb::CoordinatorMessage],
        deadline: Instant,
        step: u64,
        phase: &'static str,
    ) -> Result<()> {
        for &worker in workers {
            for message in messages {
                self.send(worker, message.clone(), deadline, step, phase).await?;
            }
        }
        Ok(())
    }

    /// Removes a worker from the run and frees its place. With `rejoin` it is told it may join
    /// again (it was late, not wrong). Returns whether it was still a peer.
    pub fn evict(&mut self, worker: u64, reason: &str, rejoin: bool) -> bool {
        let Some(index) = self.peers.iter().position(|p| p.info.id == worker) else {
            return false;
        };
        let peer = self.peers.remove(index);
        peer.try_shutdown(reason, rejoin);
        self.registry.release(worker);
        true
    }

    /// Tells every worker to leave; one that is already gone is not an error here. A run
    /// `stopped` to be resumed asks them to keep dialing this address (within their
    /// patience) instead of leaving for good.
    pub async fn dismiss_all(&mut self, reason: &str, stopped: bool) {
        let message = shutdown_message(reason, stopped, stopped);
        for peer in &self.peers {
            let _ = tokio::time::timeout(Duration::from_secs(1), peer.deliver(message.clone())).await;
        }
        for peer in self.peers.drain(..) {
            self.registry.release(peer.info.id);
        }
    }

    /// Waits until `until` for something to act on. Faults of workers in training (a closed
    /// session, a reported failure, a missed heartbeat) are errors naming the worker; those of
    /// workers not yet training only remove them.
    pub async fn wait(&mut self, until: Instant, step: u64, phase: &'static str) -> Result<Event> {
        loop {
            let check_at = self.next_heartbeat_expiry().min(until);
            let received = tokio::select! {
                received = tokio::time::timeout_at(check_at, self.events.recv()) => received,
                _ = self.stop.wait_for(|stop| *stop), if !self.stopping => {
                    self.stopping = true;
                    return Ok(Event::Stopped);
                }
            };
            match received {
                Ok(Some(event)) => {
                    if let Some(event) = self.absorb(event, step, phase)? {
                        return Ok(event);
                    }
                }
                Ok(None) => return Err(CoordinatorError::Refused("the service stopped".into())),
                Err(_) => {
                    // Nothing is queued, so every arrived message has been seen: silence now is real.
                    if let Some(event) = self.check_heartbeats(step, phase)? {
                        return Ok(event);
                    }
                    if Instant::now() >= until {
                        return Ok(Event::Timeout);
                    }
                }
            }
        }
    }

    /// The next message for the step in flight. Silence past `deadline` is the fault of the
    /// first worker in `waiting_on`; the message names all of them. A stop request shortens the
    /// deadline to a grace period and then abandons the step.
    pub async fn next(
        &mut self,
        deadline: Instant,
        step: u64,
        phase: &'static str,
        waiting_on: &[u64],
    ) -> Result<(u64, pb::worker_message::Kind)> {
        let mut deadline = deadline;
        if self.stopping() {
            self.stopping = true;
            deadline = deadline.min(Instant::now() + STOP_GRACE);
        }
        loop {
            match self.wait(deadline, step, phase).await? {
                Event::Message(worker, kind) => return Ok((worker, kind)),
                Event::Membership => {}
                Event::Stopped => deadline = deadline.min(Instant::now() + STOP_GRACE),
                Event::Timeout if self.stopping => {
                    warn!(
                        step,
                        phase,
                        ?waiting_on,
                        "abandoning the step: stop requested and workers are late"
                    );
                    return Err(CoordinatorError::Interrupted { step });
                }
                Event::Timeout => {
                    let worker = waiting_on.first().copied().unwrap_or(0);
                    return Err(self.fault(
                        worker,
                        step,
                        phase,
                        format!(
                            "no answer before the phase deadline (cluster.step_timeout_secs per shard, or sooner \
                             cluster.stall_factor times the slowest phase so far; workers still owed: {waiting_on:?})"
                        ),
                    ));
                }
            }
        }
    }

    /// Takes one event from the service; returns what the caller must act on.
    fn absorb(&mut self, event: Inbound, step: u64, phase: &'static str) -> Result<Option<Event>> {
        match event {
            Inbound::Connected { worker, outbound, data } => {
                info!(
                    worker = worker.id,
                    rank = worker.rank,
                    host = %worker.host,
                    replicas = worker.replicas,
                    "worker connected"
                );
                self.peers.push(Peer {
                    info: worker,
                    outbound,
                    data,
                    session_sent: AtomicU64::new(0),
                    data_sent: AtomicU64::new(0),
                    shards: Vec::new(),
                    assigning: None,
                    has_params: false,
                    leaving: false,
                    steps_done: 0,
                    last_seen: Instant::now(),
                });
                self.peers.sort_by_key(|p| p.info.rank);
                Ok(Some(Event::Membership))
            }
            Inbound::Closed { worker, reason } => {
                let Some(peer) = self.get(worker) else { return Ok(None) };
                if peer.trains() {
                    // The trainer evicts it, recording why.
                    return Err(self.fault(worker, step, phase, format!("lost: {reason}")));
                }
                info!(worker, %reason, "a worker not yet training left");
                self.depart(worker, format!("lost before training: {reason}"), false);
                Ok(Some(Event::Membership))
            }
            Inbound::Message {
                worker,
                message,
                arrived,
            } => {
                let Some(peer) = self.get_mut(worker) else {
                    // An evicted worker's last words.
                    return Ok(None);
                };
                peer.last_seen = peer.last_seen.max(arrived);
                match message.kind {
                    Some(pb::worker_message::Kind::Heartbeat(_)) => Ok(None),
                    Some(pb::worker_message::Kind::Leave(leave)) => {
                        if !peer.leaving {
                            peer.leaving = true;
                            info!(worker, reason = %leave.reason, "worker asked to leave; it goes at the end of this step");
                        }
                        Ok(Some(Event::Membership))
                    }
                    Some(pb::worker_message::Kind::Failure(failure)) => {
                        let fault = self.fault(worker, step, phase, format!("reported: {}", failure.message));
                        if self.get(worker).is_some_and(Peer::trains) {
                            return Err(fault);
                        }
                        warn!(%fault, "a worker not yet training failed");
                        self.depart(worker, format!("failed before training: {}", failure.message), false);
                        Ok(Some(Event::Membership))
                    }
                    Some(kind) => Ok(Some(Event::Message(worker, kind))),
                    None => Err(self.fault(worker, step, phase, "sent an empty message")),
                }
            }
        }
    }

    fn next_heartbeat_expiry(&self) -> Instant {
        self.peers
            .iter()
            .map(|p| p.last_seen + self.heartbeat_timeout)
            .min()
            .unwrap_or_else(|| Instant::now() + self.heartbeat_timeout)
    }

    /// Evicts a worker that has been silent too long. Only called with nothing queued.
    fn check_heartbeats(&mut self, step: u64, phase: &'static str) -> Result<Option<Event>> {
        let now = Instant::now();
        let Some(peer) = self.peers.iter().find(|p| now >= p.last_seen + self.heartbeat_timeout) else {
            return Ok(None);
        };
        let (worker, trains) = (peer.info.id, peer.trains());
        let message = format!(
            "sent nothing for {} s (cluster.heartbeat_timeout_secs): presumed hung or dead",
            self.heartbeat_timeout.as_secs()
        );
        let fault = self.fault(worker, step, phase, message);
        if trains {
            // The trainer evicts it, recording why. Until then it must not be found silent
            // again.
            if let Some(peer) = self.get_mut(worker) {
                peer.last_seen = now;
            }
            return Err(fault);
        }
        warn!(%fault, "evicted a silent worker that was not yet training");
        self.depart(worker, "no heartbeat in time, before training".into(), true);
        Ok(Some(Event::Membership))
    }
}

fn shutdown_message(reason: &str, rejoin: bool, stopped: bool) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage::of(pb::coordinator_message::Kind::Shutdown(pb::Shutdown {
        reason: reason.to_string(),
        rejoin,
        stopped,
    }))
}
