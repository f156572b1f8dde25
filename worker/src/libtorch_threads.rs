//! Which threads of a worker run libtorch's parallel operations, and on how many threads.
//!
//! libtorch's CPU operations run on OpenMP (GNU libgomp in PyTorch's wheel), and every thread
//! that runs a parallel operation gets a pool of its own, sized on that thread's first parallel
//! call from the process-wide default (every core). An idle pool thread busy-waits for the
//! next parallel region for 300,000 spins, but for only 100 once libgomp runs more threads than
//! there are cores (libgomp's manual, GOMP_SPINCOUNT), and then sleeps, so each of the hundreds
//! of small operations of a step first wakes its threads. A worker whose compute thread built a
//! pool of its own while loading a shard (2 more threads on 2 cores) ran every replica
//! operation 25-35% slower for it (docs/BENCHMARKS.md, "libtorch's thread pools").
//!
//! So the replica threads get their share of `--threads`, and every other thread that touches
//! libtorch runs its operations on the calling thread alone.

/// Sets how many threads libtorch's operations use when called from this thread.
pub fn use_threads(count: usize) {
    // The count is per thread, copied from the process-wide one on the thread's first
    // parallel call: read it first, so that this thread's own count is not overwritten later
    // by whatever another thread set meanwhile.
    let _ = tch::get_num_threads();
    tch::set_num_threads(count.max(1) as i32);
}

/// For threads that only prepare work (loading shards, building tensors for the replicas):
/// their operations run on this thread and start no pool.
pub fn single_threaded() {
    use_threads(1);
}
