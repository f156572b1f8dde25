//! Between two steps: who trains next. Newcomers are admitted, workers that asked to leave are
//! dismissed, the shards are re-balanced in proportion to each worker's replicas (each moved
//! shard is a download for its new holder), parameters go to whoever lacks them, and below
//! `cluster.min_workers` replicas the run pauses.

use forger_proto::pb::{self, coordinator_message::Kind as Out, worker_message::Kind as In};
use tokio::time::{Duration, Instant};
use tracing::{info, warn};

use super::{Net, Trainer};
use crate::assignment::rebalance;
use crate::error::{CoordinatorError, Result};
use crate::peers::Event;

/// While paused, how often the log says so again.
const PAUSE_REMINDER: Duration = Duration::from_secs(30);

/// How one round of settling ended.
enum Round {
    /// Every shard is held by a worker with the current parameters.
    Settled,
    /// The cluster changed under us (or a worker failed): look again.
    Again,
}

impl Trainer {
    /// Returns once every shard is held by a training worker that has the current parameters.
    /// Faults of single workers evict them and are not errors; a stop request is.
    pub(super) async fn settle(&mut self) -> Result<()> {
        let step = self.state.step;
        let cluster = self.spec.cluster.clone();
        let min = cluster.min_workers as usize;
        let join_deadline = Instant::now() + Duration::from_secs(cluster.join_timeout_secs);
        let grace = Duration::from_secs(cluster.start_grace_secs);
        let mut min_reached_at: Option<Instant> = None;
        let mut paused_at: Option<Instant> = None;
        loop {
            self.drain(step).await?;
            self.record_departures(step);
            self.dismiss_leavers(step);
            // `cluster.workers` and `min_workers` count replicas: a worker of two GPUs is two.
            let connected = self.peers.replicas();
            if !self.started {
                let now = Instant::now();
                if connected >= min {
                    min_reached_at.get_or_insert(now);
                } else {
                    min_reached_at = None;
                }
                let full = connected >= cluster.workers as usize;
                let until = match min_reached_at {
                    _ if full => None,
                    Some(at) if now >= at + grace => None,
                    Some(at) => Some(at + grace),
                    None if now >= join_deadline => {
                        return Err(CoordinatorError::JoinTimeout {
                            joined: connected,
                            expected: min,
                            secs: cluster.join_timeout_secs,
                        });
                    }
                    None => Some(join_deadline),
                };
                if let Some(until) = until {
                    self.idle_until(until, step).await?;
                    continue;
                }
            } else if connected < min {
                if paused_at.is_none() {
                    self.pause(step, connected)?;
                    paused_at = Some(Instant::now());
                }
                if self.idle_until(Instant::now() + PAUSE_REMINDER, step).await? {
                    warn!(
                        step,
                        replicas = connected,
                        min_workers = min,
                        "still paused: waiting for workers to join"
                    );
                }
                continue;
            }
            if let Some(at) = paused_at.take() {
                let paused_secs = at.elapsed().as_secs_f64();
                let workers = self.peers.all().len();
                info!(
                    step,
                    workers,
                    replicas = connected,
                    paused_secs,
                    "enough workers again: training resumes"
                );
                self.history.record(
                    step,
                    "resumed",
                    serde_json::json!({ "workers": workers, "replicas": connected, "paused_secs": paused_secs }),
                );
            }
            if let Round::Settled = self.assign_and_sync(step).await? {
                if !self.started {
                    self.started = true;
                    let workers = self.peers.all().len();
                    let replicas = self.peers.replicas();
                    info!(from = step, to = self.spec.train.steps, workers, replicas, "training");
                    self.history.record(
                        step,
                        "started",
                        serde_json::json!({ "workers": workers, "replicas": replicas }),
                    );
                }
                return Ok(());
            }
        }
    }

    /// Handles whatever the workers sent while no step was running.
    async fn drain(&mut self, step: u64) -> Result<()> {
        loop {
            match self.peers.wait(Instant::now(), step, "between steps").await {
                Ok(Event::Timeout) => return Ok(()),
                Ok(Event::Membership) => {}
                Ok(Event::Stopped) => return Err(CoordinatorError::Interrupted { step }),
                Ok(Event::Message(worker, kind)) => self.between_steps_message(worker, kind, step),
                Err(e) => self.evict_for(e)?,
            }
        }
    }

    /// Waits for a change in the cluster until `until`. Returns true when the time ran out.
    async fn idle_until(&mut self, until: Instant, step: u64) -> Result<bool> {
        match self.peers.wait(until, step, "waiting for workers").await {
            Ok(Event::Timeout) => Ok(true),
            Ok(Event::Membership) => Ok(false),
            Ok(Event::Stopped) => Err(CoordinatorError::Interrupted { step }),
            Ok(Event::Message(worker, kind)) => {
                self.between_steps_message(worker, kind, step);
                Ok(false)
            }
            Err(e) => self.evict_for(e).map(|()| false),
        }
    }

    /// Between steps only late answers to an abandoned attempt are expected; anything else
    /// is a worker out of step, which is evicted.
    fn between_steps_message(&mut self, worker: u64, kind: In, step: u64) {
        if !self.is_leftover(&kind) {
            let fault = self.unexpected(worker, step, "between steps", &kind);
            let _ = self.evict_for(fault);
        }
    }

    /// Evicts the worker a fault names; other errors pass through.
    fn evict_for(&mut self, error: CoordinatorError) -> Result<()> {
        match error {
            CoordinatorError::Worker {
                worker,
                host,
                step,
                phase,
                message,
            } => {
                warn!(worker, %host, step, phase, %message, "evicting the worker");
                self.evict(worker, &host, phase, &message);
                Ok(())
            }
            other => Err(other),
        }
    }

    /// Writes down the workers the sessions layer removed before they trained.
    fn record_departures(&mut self, step: u64) {
        for (worker, host, reason) in self.peers.take_departures() {
            self.summary.evictions += 1;
            self.history.record(
                step,
                "evicted",
                serde_json::json!({ "worker": worker, "host": host, "phase": "before training", "reason": reason }),
            );
        }
    }

    fn dismiss_leavers(&mut self, step: u64) {
        let leaving: Vec<(u64, String)> = self
            .peers
            .all()
            .iter()
            .filter(|p| p.leaving)
            .map(|p| (p.info.id, p.info.host.clone()))
            .collect();
        for (worker, host) in leaving {
            info!(worker, %host, step, "the worker leaves as it asked");
            self.peers.evict(worker, "you asked to leave", false);
            self.history
                .record(step, "left", serde_json::json!({ "worker": worker, "host": host }));
        }
    }

    /// Too few replicas: keep what was computed, say so, and wait.
    fn pause(&mut self, step: u64, replicas: usize) -> Result<()> {
        let min = self.spec.cluster.min_workers;
        let workers = self.peers.all().len();
        warn!(
            step,
            workers,
            replicas,
            min_workers = min,
            "paused: fewer replicas than cluster.min_workers; training resumes when enough join"
        );
        self.history.record(
            step,
            "paused",
            serde_json::json!({ "workers": workers, "replicas": replicas, "min_workers": min }),
        );
        if self.state.step > self.last_checkpoint {
            self.save_checkpoint()?;
        }
        Ok(())
    }

    /// Re-balances the shards over the connected workers, sends the parameters to whoever
    /// lacks them and waits for every moved shard to be downloaded.
    async fn assign_and_sync(&mut self, step: u64) -> Result<Round> {
        let ids: Vec<u64> = self.peers.all().iter().map(|p| p.info.id).collect();
        // A worker still owing a Ready holds what it was last told to, not what it confirmed.
        let current: Vec<Vec<u32>> = self
            .peers
            .all()
            .iter()
            .map(|p| p.assigning.clone().unwrap_or_else(|| p.shards.clone()))
            .collect();
        let replicas: Vec<u32> = self.peers.all().iter().map(|p| p.info.replicas).collect();
        let next = rebalance(&current, &replicas, self.shards());
        let deadline = Instant::now() + Duration::from_secs(self.spec.cluster.step_timeout_secs);
        let mut awaiting: Vec<(u64, Vec<u32>)> = Vec::new();
        for (&worker, shards) in ids.iter().zip(next) {
            let Some(peer) = self.peers.get_mut(worker) else {
                continue;
            };
            let newcomer = peer.shards.is_empty() && peer.assigning.is_none();
            if peer.shards == shards && peer.assigning.is_none() {
                continue;
            }
            peer.assigning = Some(shards.clone());
            self.peers.registry().assign(worker, &shards);
            let assign = pb::CoordinatorMessage::of(Out::Assign(pb::Assign { shards: shards.clone() }));
            if let Err(e) = self.peers.send(worker, assign, deadline, step, "assign").await {
                self.evict_for(e)?;
                return Ok(Round::Again);
            }
            if newcomer {
                self.summary.joins += u64::from(self.started);
                let (host, replicas) = self
                    .peers
                    .get(worker)
                    .map(|p| (p.info.host.clone(), p.info.replicas))
                    .unwrap_or_default();
                self.history.record(
                    step,
                    "joined",
                    serde_json::json!({ "worker": worker, "host": host, "replicas": replicas, "shards": shards }),
                );
            }
            awaiting.push((worker, shards));
        }
        let lacking: Vec<u64> = self
            .peers
            .all()
            .iter()
            .filter(|p| !p.has_params)
            .map(|p| p.info.id)
            .collect();
        // One encoding of each network, shared by every worker that needs it.
        for net in [Net::Discriminator, Net::Generator] {
            if lacking.is_empty() {
                break;
            }
            if let Err(e) = self.broadcast_params(net, step, &lacking, deadline).await {
                self.evict_for(e)?;
                return Ok(Round::Again);
            }
        }
        while !awaiting.is_empty() {
            awaiting.retain(|(worker, _)| self.peers.get(*worker).is_some());
            if awaiting.is_empty() {
                // Whoever we waited for is gone: their shards need new holders.
                return Ok(Round::Again);
            }
            match self.peers.wait(deadline, step, "assign").await {
                Ok(Event::Message(worker, In::Ready(ready))) => {
                    let Some(index) = awaiting.iter().position(|(w, _)| *w == worker) else {
                        continue;
                    };
                    if ready.shards != awaiting[index].1 {
                        continue; // the answer to an earlier Assign
                    }
                    let (_, shards) = awaiting.remove(index);
                    if let Some(peer) = self.peers.get_mut(worker) {
                        peer.shards = shards;
                        peer.assigning = None;
                    }
                }
                Ok(Event::Message(worker, kind)) => self.between_steps_message(worker, kind, step),
                Ok(Event::Membership) => {}
                Ok(Event::Stopped) => return Err(CoordinatorError::Interrupted { step }),
                Ok(Event::Timeout) => {
                    for (worker, _) in std::mem::take(&mut awaiting) {
                        let fault = self.peers.fault(
                            worker,
                            step,
                            "assign",
                            "did not confirm its shards in time (cluster.step_timeout_secs)",
                        );
                        self.evict_for(fault)?;
                    }
                    return Ok(Round::Again);
                }
                Err(e) => {
                    self.evict_for(e)?;
                    return Ok(Round::Again);
                }
            }
        }
        for worker in lacking {
            if let Some(peer) = self.peers.get_mut(worker) {
                peer.has_params = true;
            }
        }
        // A worker that arrived meanwhile is admitted at the next round.
        if self.peers.all().iter().any(|p| p.shards.is_empty()) && !self.started {
            return Ok(Round::Again);
        }
        let every_shard_held = {
            let mut held: Vec<u32> = self.peers.training().flat_map(|p| p.shards.iter().copied()).collect();
            held.sort_unstable();
            held == (0..self.shards()).collect::<Vec<_>>()
        };
        let all_synced = self.peers.all().iter().all(|p| p.has_params || !p.trains());
        Ok(if every_shard_held && all_synced && !self.peers.all().is_empty() {
            Round::Settled
        } else {
            Round::Again
        })
    }
}
