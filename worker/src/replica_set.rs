//! A worker's replicas, one thread each (`--devices`): every replica holds its own copy of both
//! networks on its device, and jobs sent to different replicas run in parallel.
//!
//! A job is a closure run on a replica's thread with that replica and the step batches it
//! keeps. Jobs sent to one replica run in the order sent; [`ReplicaSet::run`] waits for every
//! job it was given and returns their results in the order of the jobs, so the compute thread
//! sees one sequence of results whatever ran first.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::thread::JoinHandle;

use forger_common::spec::ModelSpec;
use tch::Device;

use crate::device;
use crate::error::{Result, WorkerError};
use crate::replica::{Replica, StepBatch};

/// What a replica's thread owns.
#[derive(Debug)]
pub struct Slot {
    pub replica: Replica,
    /// The step in progress's batches of the shards this replica computes, by shard.
    pub batches: BTreeMap<u32, StepBatch>,
}

/// Work for one replica, run on its thread.
pub type Job<T> = Box<dyn FnOnce(&mut Slot) -> Result<T> + Send>;

type Task = Box<dyn FnOnce(&mut Slot) + Send>;

#[derive(Debug)]
struct ReplicaThread {
    tasks: Option<mpsc::Sender<Task>>,
    handle: Option<JoinHandle<()>>,
}

/// The replicas of one worker process.
#[derive(Debug)]
pub struct ReplicaSet {
    threads: Vec<ReplicaThread>,
}

/// Shares out `threads` libtorch intra-op threads among `replicas` (the first get the
/// remainder), at least one each.
pub fn thread_shares(threads: usize, replicas: usize) -> Vec<usize> {
    (0..replicas)
        .map(|i| (threads / replicas + usize::from(i < threads % replicas)).max(1))
        .collect()
}

impl ReplicaSet {
    /// Starts one thread per device, each building its replica and then computing with its
    /// share of `threads` libtorch intra-op threads.
    pub fn start(model: &ModelSpec, image_size: usize, devices: &[Device], threads: usize) -> Result<ReplicaSet> {
        assert!(!devices.is_empty(), "a worker runs at least one replica");
        let shares = thread_shares(threads, devices.len());
        let mut set = ReplicaSet { threads: Vec::new() };
        let mut built = Vec::new();
        for (index, (&device, &share)) in devices.iter().zip(&shares).enumerate() {
            let (tasks, queue) = mpsc::channel::<Task>();
            let (ready, started) = mpsc::channel::<Result<()>>();
            let model = model.clone();
            let handle = std::thread::Builder::new()
                .name(format!("forger-replica-{index}"))
                .spawn(move || {
                    crate::libtorch_threads::use_threads(share);
                    let replica = match Replica::new(&model, image_size, device) {
                        Ok(replica) => replica,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    if ready.send(Ok(())).is_err() {
                        return;
                    }
                    let mut slot = Slot {
                        replica,
                        batches: BTreeMap::new(),
                    };
                    while let Ok(task) = queue.recv() {
                        task(&mut slot);
                    }
                })
                .map_err(|e| WorkerError::Replica(format!("failed to start replica {index}'s thread: {e}")))?;
            set.threads.push(ReplicaThread {
                tasks: Some(tasks),
                handle: Some(handle),
            });
            built.push((index, device, started));
        }
        for (index, device, started) in built {
            started
                .recv()
                .map_err(|_| WorkerError::Replica(format!("replica {index}'s thread ended while starting")))?
                .map_err(|e| WorkerError::Replica(format!("replica {index} on {}: {e}", device::describe(device))))?;
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Runs each job on the replica it names and returns their results in the order given:
    /// the first error, once every job has ended, if any failed.
    pub fn run<T: Send + 'static>(&self, jobs: Vec<(usize, Job<T>)>) -> Result<Vec<T>> {
        let count = jobs.len();
        let (done, results) = mpsc::channel::<(usize, Result<T>)>();
        for (order, (replica, job)) in jobs.into_iter().enumerate() {
            let done = done.clone();
            let task: Task = Box::new(move |slot| {
                let _ = done.send((order, job(slot)));
            });
            let sent = self.threads[replica]
                .tasks
                .as_ref()
                .is_some_and(|t| t.send(task).is_ok());
            if !sent {
                return Err(WorkerError::Replica(format!("replica {replica}'s thread has stopped")));
            }
        }
        drop(done);
        let mut out: Vec<Option<Result<T>>> = (0..count).map(|_| None).collect();
        for _ in 0..count {
            // Every sender went with its job: a job that never answered panicked its thread.
            let (order, result) = results
                .recv()
                .map_err(|_| WorkerError::Replica("a replica's thread stopped during a job".into()))?;
            out[order] = Some(result);
        }
        out.into_iter().map(|r| r.expect("every job answered")).collect()
    }

    /// Runs `job(i)` on every replica `i` and returns the results in replica order.
    pub fn each<T: Send + 'static>(&self, job: impl Fn(usize) -> Job<T>) -> Result<Vec<T>> {
        self.run((0..self.len()).map(|i| (i, job(i))).collect())
    }
}

impl Drop for ReplicaSet {
    fn drop(&mut self) {
        // Closing the queues ends the threads once their last task is done.
        for thread in &mut self.threads {
            thread.tasks.take();
        }
        for thread in &mut self.threads {
            if let Some(handle) = thread.handle.take() {
                let _ = handle.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::torch_rng;
    use crate::replica::{Contribution, Net, noise};
    use forger_common::init::initial_parameters;
    use forger_common::layout;
    use tch::Tensor;

    fn images(count: usize, size: usize) -> Tensor {
        let values: Vec<f32> = (0..count * 3 * size * size)
            .map(|i| ((i * 37) % 101) as f32 / 100.0)
            .collect();
        Tensor::from_slice(&values).view([count as i64, 3, size as i64, size as i64])
    }

    #[test]
    fn replicas_on_their_threads_give_the_bits_of_one_replica_computing_in_turn() {
        // Dropout masks come from libtorch's one generator: replicas drawing at once must
        // still draw each mask from its own seed.
        let _rng = torch_rng();
        let model = ModelSpec {
            d_filters: vec![8, 4, 2],
            g_filters: vec![8, 4, 2],
            dropout: 0.5,
            ..ModelSpec::default()
        };
        let size = 16;
        let d = initial_parameters(&layout::discriminator_layout(&model, size), 1);
        let g = initial_parameters(&layout::generator_layout(&model), 2);
        let set = ReplicaSet::start(&model, size, &[Device::Cpu, Device::Cpu], 2).unwrap();
        assert_eq!(set.len(), 2);
        set.each(|_| -> Job<()> {
            let (d, g) = (d.clone(), g.clone());
            Box::new(move |slot| {
                slot.replica.set_params(Net::Discriminator, &d)?;
                slot.replica.set_params(Net::Generator, &g)
            })
        })
        .unwrap();
        let dim = model.noise_dim as usize;
        let jobs: Vec<(usize, Job<(Contribution, Contribution)>)> = (0..12u64)
            .map(|k| -> (usize, Job<(Contribution, Contribution)>) {
                let job: Job<(Contribution, Contribution)> = Box::new(move |slot| {
                    let z = noise(k, 4, dim, Device::Cpu)?;
                    let d = slot.replica.discriminator_gradient(&images(4, size), &z, 100 + k)?;
                    let g = slot.replica.generator_gradient(&z, 200 + k)?;
                    Ok((d, g))
                });
                (k as usize % 2, job)
            })
            .collect();
        let parallel = set.run(jobs).unwrap();

        tch::set_num_threads(1);
        let mut alone = Replica::new(&model, size, Device::Cpu).unwrap();
        alone.set_params(Net::Discriminator, &d).unwrap();
        alone.set_params(Net::Generator, &g).unwrap();
        for (k, (d, g)) in parallel.iter().enumerate() {
            let k = k as u64;
            let z = noise(k, 4, dim, Device::Cpu).unwrap();
            assert_eq!(
                d,
                &alone.discriminator_gradient(&images(4, size), &z, 100 + k).unwrap(),
                "D {k}"
            );
            assert_eq!(g, &alone.generator_gradient(&z, 200 + k).unwrap(), "G {k}");
        }
        // Another seed, another mask: the comparison above could tell them apart.
        let z = noise(0, 4, dim, Device::Cpu).unwrap();
        assert_ne!(
            parallel[0].0,
            alone.discriminator_gradient(&images(4, size), &z, 101).unwrap()
        );
    }

    #[test]
    fn each_replica_computes_with_its_share_of_the_threads() {
        let model = ModelSpec {
            d_filters: vec![4, 2, 2],
            g_filters: vec![4, 2, 2],
            ..ModelSpec::default()
        };
        let set = ReplicaSet::start(&model, 8, &[Device::Cpu, Device::Cpu], 3).unwrap();
        // libtorch's count is per thread: set on one replica's thread, it stays there.
        let threads = set
            .each(|_| -> Job<i32> { Box::new(|_| Ok(tch::get_num_threads())) })
            .unwrap();
        assert_eq!(threads, vec![2, 1]);
    }

    #[test]
    fn a_failing_job_is_an_error_and_the_replica_works_on() {
        let model = ModelSpec {
            d_filters: vec![4, 2, 2],
            g_filters: vec![4, 2, 2],
            ..ModelSpec::default()
        };
        let set = ReplicaSet::start(&model, 8, &[Device::Cpu], 1).unwrap();
        let wrong: Job<()> = Box::new(|slot| slot.replica.set_params(Net::Generator, &[0.0; 3]));
        let err = set.run(vec![(0, wrong)]).unwrap_err().to_string();
        assert!(err.contains("generator parameters"), "{err}");
        let crc = set.each(|_| -> Job<u32> { Box::new(|slot| slot.replica.params_crc32()) });
        assert_eq!(crc.unwrap().len(), 1);
        let err = ReplicaSet::start(&model, 42, &[Device::Cpu], 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("replica 0 on cpu"), "{err}");
    }

    #[test]
    fn threads_are_shared_out_at_least_one_each() {
        assert_eq!(thread_shares(8, 1), vec![8]);
        assert_eq!(thread_shares(2, 2), vec![1, 1]);
        assert_eq!(thread_shares(5, 2), vec![3, 2]);
        assert_eq!(thread_shares(1, 3), vec![1, 1, 1]);
    }
}
