//! Who has joined the job, and what each worker is entitled to download.
//!
//! The gRPC service writes here at Join; the trainer reads it to know ranks and hosts.

use std::sync::{Arc, Mutex};

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
struct Inner {
    job: Arc<Job>,
    workers: Vec<WorkerInfo>,
    next_id: u64,
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
        // A panic while holding this lock is a bug elsewhere; the data is still consistent
        // because every update below is a single push.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn job(&self) -> Arc<Job> {
        self.lock().job.clone()
    }

    /// Admits a worker and gives it the next rank, or refuses when the cluster is full.
    pub fn join(&self, host: String, device: String, threads: u32) -> Result<WorkerInfo> {
        let mut inner = self.lock();
        if inner.workers.len() >= inner.job.expected_workers {
            return Err(CoordinatorError::Refused(format!(
                "the cluster is full: the job asks for {} workers and all have joined",
                inner.job.expected_workers
            )));
        }
        let info = WorkerInfo {
            id: inner.next_id,
            rank: inner.workers.len() as u32,
            host,
            device,
            threads,
        };
        inner.next_id += 1;
        inner.workers.push(info.clone());
        Ok(info)
    }

    pub fn worker(&self, id: u64) -> Option<WorkerInfo> {
        self.lock().workers.iter().find(|w| w.id == id).cloned()
    }
}
