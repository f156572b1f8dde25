//! Who has joined the job, and what each worker is entitled to download.
//!
//! The gRPC service writes here at Join; the trainer assigns shards here and frees the place
//! of a worker it evicts, so that a replacement can join at any time during the run.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forger_proto::connection::Connection;
use subtle::ConstantTimeEq;

use crate::dataset::PreparedDataset;
use crate::error::{CoordinatorError, Result};

/// A worker as it described itself at Join.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub id: u64,
    pub rank: u32,
    pub host: String,
    pub device: String,
    pub threads: u32,
    /// Replicas it runs (at least 1): each takes a place in the job and computes a shard at a
    /// time.
    pub replicas: u32,
}

/// What the service needs to answer Join and FetchShard.
#[derive(Debug)]
pub struct Job {
    pub spec_toml: String,
    pub fingerprint: u64,
    /// Places in the job: one per shard (`cluster.workers`); each replica takes one.
    pub expected_workers: usize,
    pub dataset: Arc<PreparedDataset>,
    pub shards: Vec<Vec<u32>>,
}

/// Random bytes handed to a worker at Join. Its data connection and its Session must show them,
/// so that knowing a worker's id is not enough to speak for it.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken([u8; 32]);

impl SessionToken {
    fn random() -> Result<SessionToken> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| {
            CoordinatorError::Refused(format!(
                "the operating system gave no random bytes for a session token: {e}"
            ))
        })?;
        Ok(SessionToken(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Compares in constant time, so that timing does not tell how much of a guess was right.
    fn matches(&self, shown: &[u8]) -> bool {
        shown.len() == self.0.len() && bool::from(self.0.ct_eq(shown))
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken(..)")
    }
}

#[derive(Debug)]
struct Entry {
    info: WorkerInfo,
    token: SessionToken,
    joined_at: Instant,
    connected: bool,
    /// The worker's data connection, from its acceptance until its Session opens.
    data: Option<Connection>,
    /// The shards the trainer assigned; only these may be downloaded.
    shards: Vec<u32>,
}

#[derive(Debug)]
struct Inner {
    job: Arc<Job>,
    workers: Vec<Entry>,
    next_id: u64,
}

/// A worker that joined but opened no Session within this time is presumed dead, and its
/// place goes to the next worker that joins (a worker opens its session right after Join).
const RECLAIM_AFTER: Duration = Duration::from_secs(10);

/// Why a session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connect {
    /// The id holds no place: never joined, or released after it was evicted or went silent.
    NoPlace,
    /// The session token is not the one handed out at Join.
    BadToken,
    /// The id already has an open session.
    AlreadyConnected,
    /// The worker opened no data connection before its Session.
    NoDataConnection,
}

/// Shared between the service and the trainer.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
    data_parked: Arc<tokio::sync::Notify>,
}

impl Registry {
    pub fn new(job: Job) -> Self {
        Registry {
            inner: Arc::new(Mutex::new(Inner {
                job: Arc::new(job),
                workers: Vec::new(),
                next_id: 1,
            })),
            data_parked: Arc::new(tokio::sync::Notify::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock is a bug elsewhere; every update below leaves the
        // data consistent, so carrying on is safe.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn job(&self) -> Arc<Job> {
        self.lock().job.clone()
    }

    /// Admits a worker of `replicas` replicas (0 counts as 1) into the lowest free rank while
    /// the job has a free place, or refuses. The job has a place per shard and each replica
    /// takes one; a worker with more replicas than places left still joins (its shards are
    /// shared in proportion to replicas, so the others give some up).
    pub fn join(
        &self,
        host: String,
        device: String,
        threads: u32,
        replicas: u32,
    ) -> Result<(WorkerInfo, SessionToken)> {
        let token = SessionToken::random()?;
        let mut inner = self.lock();
        let expected = inner.job.expected_workers;
        inner
            .workers
            .retain(|e| e.connected || e.joined_at.elapsed() < RECLAIM_AFTER);
        let places_taken: usize = inner.workers.iter().map(|e| e.info.replicas as usize).sum();
        if places_taken >= expected {
            return Err(CoordinatorError::ClusterFull(format!(
                "the cluster is full: the job has places for {expected} replicas (cluster.workers) and all are taken \
                 (a lost worker's places free when it is evicted; one that never opened its session, {} s after it \
                 joined)",
                RECLAIM_AFTER.as_secs()
            )));
        }
        // Each worker takes at least one place, so fewer workers than places hold ranks.
        let ranks: Vec<u32> = inner.workers.iter().map(|e| e.info.rank).collect();
        let rank = (0..expected as u32)
            .find(|r| !ranks.contains(r))
            .expect("fewer workers than places");
        let info = WorkerInfo {
            id: inner.next_id,
            rank,
            host,
            device,
            threads,
            replicas: replicas.max(1),
        };
        inner.next_id += 1;
        inner.workers.push(Entry {
            info: info.clone(),
            token: token.clone(),
            joined_at: Instant::now(),
            connected: false,
            data: None,
            shards: Vec::new(),
        });
        Ok((info, token))
    }

    /// The worker of this id, if it still holds its place.
    pub fn worker(&self, id: u64) -> Option<WorkerInfo> {
        self.lock()
            .workers
            .iter()
            .find(|e| e.info.id == id)
            .map(|e| e.info.clone())
    }

    /// Whether worker `id` may open a data connection with `token`: the refusal to send if not.
    pub fn check_data(&self, id: u64, token: &[u8]) -> Result<(), String> {
        data_refusal(self.lock().workers.iter().find(|e| e.info.id == id), id, token)
    }

    /// Holds a worker's accepted data connection until its Session opens; a second one
    /// replaces the first (the worker reconnected before its Session).
    pub fn park_data(&self, id: u64, token: &[u8], stream: Connection) -> Result<(), String> {
        let mut inner = self.lock();
        let entry = inner.workers.iter_mut().find(|e| e.info.id == id);
        data_refusal(entry.as_deref(), id, token)?;
        entry.expect("checked above").data = Some(stream);
        drop(inner);
        self.data_parked.notify_waiters();
        Ok(())
    }

    /// Resolves after the next data connection is parked; see [`Registry::connect_when_ready`].
    fn data_parked(&self) -> tokio::sync::futures::Notified<'_> {
        self.data_parked.notified()
    }

    /// [`Registry::connect`], waiting up to `patience` for the data connection: a worker opens
    /// its Session once the data connection is welcomed, which is a moment before it is parked.
    pub async fn connect_when_ready(
        &self,
        id: u64,
        token: &[u8],
        patience: Duration,
    ) -> Result<(WorkerInfo, Connection), Connect> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            // Registered before the check, so a park between the check and the wait is seen.
            let parked = self.data_parked();
            tokio::pin!(parked);
            parked.as_mut().enable();
            match self.connect(id, token) {
                Err(Connect::NoDataConnection) if tokio::time::Instant::now() < deadline => {
                    let _ = tokio::time::timeout_at(deadline, parked).await;
                }
                result => return result,
            }
        }
    }

    /// Marks the worker's Session open and hands over its data connection. A worker has one
    /// session: a second Hello with the same id (a confused or hostile client) is refused,
    /// never allowed to stand in for it.
    pub fn connect(&self, id: u64, token: &[u8]) -> Result<(WorkerInfo, Connection), Connect> {
        let mut inner = self.lock();
        let entry = inner
            .workers
            .iter_mut()
            .find(|e| e.info.id == id)
            .ok_or(Connect::NoPlace)?;
        if !entry.token.matches(token) {
            return Err(Connect::BadToken);
        }
        if entry.connected {
            return Err(Connect::AlreadyConnected);
        }
        let data = entry.data.take().ok_or(Connect::NoDataConnection)?;
        entry.connected = true;
        Ok((entry.info.clone(), data))
    }

    /// Records the shards a worker may download from now on.
    pub fn assign(&self, id: u64, shards: &[u32]) {
        if let Some(entry) = self.lock().workers.iter_mut().find(|e| e.info.id == id) {
            entry.shards = shards.to_vec();
        }
    }

    /// Whether the worker holds a place and was assigned `shard`.
    pub fn may_fetch(&self, id: u64, shard: u32) -> bool {
        self.lock()
            .workers
            .iter()
            .any(|e| e.info.id == id && e.shards.contains(&shard))
    }

    /// Frees a worker's place (it left, or was evicted).
    pub fn release(&self, id: u64) {
        self.lock().workers.retain(|e| e.info.id != id);
    }
}

/// Why worker `id`'s `entry` may not open a data connection with `token`, if it may not.
fn data_refusal(entry: Option<&Entry>, id: u64, token: &[u8]) -> Result<(), String> {
    let Some(entry) = entry else {
        return Err(format!(
            "worker {id} holds no place in the job (never joined, or evicted)"
        ));
    };
    if !entry.token.matches(token) {
        return Err(format!(
            "the session token is not the one worker {id} was given at Join"
        ));
    }
    if entry.connected {
        return Err(format!("worker {id} already has a session and its data connection"));
    }
    Ok(())
}
