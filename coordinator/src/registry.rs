//! Who has joined the job, and what each worker is entitled to download.
//!
//! The gRPC service writes here at Join; the trainer assigns shards here and frees the place
//! of a worker it evicts, so that a replacement can join at any time during the run.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
}

/// What the service needs to answer Join and FetchShard.
#[derive(Debug)]
pub struct Job {
    pub spec_toml: String,
    pub fingerprint: u64,
    pub expected_workers: usize,
    pub dataset: Arc<PreparedDataset>,
    pub shards: Vec<Vec<u32>>,
}

#[derive(Debug)]
struct Entry {
    info: WorkerInfo,
    joined_at: Instant,
    connected: bool,
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
    /// The id already has an open session.
    AlreadyConnected,
}

/// Shared between the service and the trainer.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
}

impl Registry {
    pub fn new(job: Job) -> Self {
        Registry {
            inner: Arc::new(Mutex::new(Inner {
                job: Arc::new(job),
                workers: Vec::new(),
                next_id: 1,
            })),
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

    /// Admits a worker into the lowest free rank, or refuses when every rank is taken.
    pub fn join(&self, host: String, device: String, threads: u32) -> Result<WorkerInfo> {
        let mut inner = self.lock();
        let expected = inner.job.expected_workers;
        inner
            .workers
            .retain(|e| e.connected || e.joined_at.elapsed() < RECLAIM_AFTER);
        let taken: Vec<u32> = inner.workers.iter().map(|e| e.info.rank).collect();
        let Some(rank) = (0..expected as u32).find(|r| !taken.contains(r)) else {
            return Err(CoordinatorError::ClusterFull(format!(
                "the cluster is full: the job has places for {expected} workers and all are taken (a lost worker's \
                 place frees when it is evicted; one that never opened its session, {} s after it joined)",
                RECLAIM_AFTER.as_secs()
            )));
        };
        let info = WorkerInfo {
            id: inner.next_id,
            rank,
            host,
            device,
            threads,
        };
        inner.next_id += 1;
        inner.workers.push(Entry {
            info: info.clone(),
            joined_at: Instant::now(),
            connected: false,
            shards: Vec::new(),
        });
        Ok(info)
    }

    /// The worker of this id, if it still holds its place.
    pub fn worker(&self, id: u64) -> Option<WorkerInfo> {
        self.lock()
            .workers
            .iter()
            .find(|e| e.info.id == id)
            .map(|e| e.info.clone())
    }

    /// Marks the worker's Session open. A worker has one session: a second Hello with the
    /// same id (a confused or hostile client) is refused, never allowed to stand in for it.
    pub fn connect(&self, id: u64) -> Result<WorkerInfo, Connect> {
        let mut inner = self.lock();
        let entry = inner
            .workers
            .iter_mut()
            .find(|e| e.info.id == id)
            .ok_or(Connect::NoPlace)?;
        if entry.connected {
            return Err(Connect::AlreadyConnected);
        }
        entry.connected = true;
        Ok(entry.info.clone())
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
