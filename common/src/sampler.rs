//! Sharding the dataset among workers and choosing each step's batch.
//!
//! The coordinator owns both decisions: it tells every worker, in each step's Evaluate
//! message, which images of its shard to use. The position in each shard is therefore part of
//! the coordinator's checkpoint, and a resumed run draws exactly the batches it would have.

use serde::{Deserialize, Serialize};

use crate::seeds::{self, Stream};
use crate::spec::JobSpec;

/// The images of a dataset that a run trains on, and those it holds out for its quality
/// score, as dataset indices in increasing order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub training: Vec<u32>,
    pub held_out: Vec<u32>,
}

/// Sets `held_out` of `0..n_items` aside (a seeded draw, so a resumed run holds out the same
/// images), the rest for training. With none held out, training is `0..n_items`, so the shards
/// are those of a run that never scored.
pub fn split_held_out(n_items: usize, held_out: usize, seed: u64) -> Split {
    assert!(held_out <= n_items, "cannot hold out {held_out} of {n_items} images");
    let mut all: Vec<u32> = (0..n_items as u32).collect();
    if held_out == 0 {
        return Split {
            training: all,
            held_out: Vec::new(),
        };
    }
    shuffle(&mut all, seeds::derive(seed, Stream::HeldOut, &[n_items as u64]));
    let mut held = all.split_off(n_items - held_out);
    held.sort_unstable();
    all.sort_unstable();
    Split {
        training: all,
        held_out: held,
    }
}

/// The split a job makes of a dataset of `n_items` images: what its quality settings hold
/// out, with its seed. The coordinator and the single-process loop both use it, so they train
/// on the same images.
pub fn split_for(spec: &JobSpec, n_items: usize) -> Split {
    split_held_out(n_items, spec.quality.held_out_of(n_items), spec.train.seed)
}

/// Splits the dataset indices `items` into `workers` shards of near-equal size (they differ by
/// at most one) after a seeded shuffle, so that each shard is a fair sample of the whole folder.
pub fn assign_shards(mut items: Vec<u32>, workers: usize, seed: u64) -> Vec<Vec<u32>> {
    assert!(workers >= 1, "at least one worker");
    let n_items = items.len();
    shuffle(
        &mut items,
        seeds::derive(seed, Stream::Shards, &[n_items as u64, workers as u64]),
    );
    let base = n_items / workers;
    let extra = n_items % workers;
    let mut shards = Vec::with_capacity(workers);
    let mut start = 0;
    for rank in 0..workers {
        let len = base + usize::from(rank < extra);
        shards.push(items[start..start + len].to_vec());
        start += len;
    }
    shards
}

/// Fisher-Yates with the portable generator.
fn shuffle(items: &mut [u32], seed: u64) {
    let mut rng = seeds::rng(seed);
    for i in (1..items.len()).rev() {
        let j = (rand_chacha::rand_core::Rng::next_u64(&mut rng) % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Where a shard's sampler stands: which pass over the shard, and how far into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    pub cursor: usize,
}

/// Draws batches from one shard, reshuffling it at the start of every epoch.
#[derive(Debug, Clone)]
pub struct BatchSampler {
    seed: u64,
    shard_index: u32,
    shard: Vec<u32>,
    order: Vec<u32>,
    state: SamplerState,
}

impl BatchSampler {
    pub fn new(seed: u64, shard_index: u32, shard: Vec<u32>, state: SamplerState) -> Self {
        let mut sampler = BatchSampler {
            seed,
            shard_index,
            order: Vec::new(),
            shard,
            state,
        };
        sampler.reshuffle();
        sampler
    }

    fn reshuffle(&mut self) {
        self.order.clone_from(&self.shard);
        let seed = seeds::derive(
            self.seed,
            Stream::Epoch,
            &[u64::from(self.shard_index), self.state.epoch],
        );
        shuffle(&mut self.order, seed);
    }

    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// Goes back to an earlier position (a step that was undone).
    pub fn rewind(&mut self, state: SamplerState) {
        let epoch_changed = state.epoch != self.state.epoch;
        self.state = state;
        if epoch_changed {
            self.reshuffle();
        }
    }

    /// The next `batch` dataset indices, continuing into the next epoch when this one runs out.
    pub fn next_batch(&mut self, batch: usize) -> Vec<u32> {
        assert!(!self.shard.is_empty(), "sampling from an empty shard");
        let mut out = Vec::with_capacity(batch);
        while out.len() < batch {
            if self.state.cursor >= self.order.len() {
                self.state.epoch += 1;
                self.state.cursor = 0;
                self.reshuffle();
            }
            let take = (batch - out.len()).min(self.order.len() - self.state.cursor);
            out.extend_from_slice(&self.order[self.state.cursor..self.state.cursor + take]);
            self.state.cursor += take;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn shards_partition_the_dataset() {
        let items = || (0..103).collect::<Vec<u32>>();
        let shards = assign_shards(items(), 4, 9);
        assert_eq!(shards.iter().map(Vec::len).collect::<Vec<_>>(), vec![26, 26, 26, 25]);
        let all: HashSet<u32> = shards.iter().flatten().copied().collect();
        assert_eq!(all.len(), 103);
        assert_eq!(shards, assign_shards(items(), 4, 9));
        assert_ne!(shards, assign_shards(items(), 4, 10));
    }

    #[test]
    fn held_out_images_are_a_fixed_draw_that_no_shard_holds() {
        let split = split_held_out(1000, 100, 3);
        assert_eq!((split.training.len(), split.held_out.len()), (900, 100));
        assert_eq!(split, split_held_out(1000, 100, 3));
        assert_ne!(split.held_out, split_held_out(1000, 100, 4).held_out);
        // Spread over the folder, not its first or last files.
        assert!(split.held_out[0] < 100 && *split.held_out.last().unwrap() > 900);
        let held: HashSet<u32> = split.held_out.iter().copied().collect();
        let shards = assign_shards(split.training.clone(), 3, 3);
        assert!(shards.iter().flatten().all(|i| !held.contains(i)));
        assert_eq!(shards.iter().map(Vec::len).sum::<usize>(), 900);
    }

    #[test]
    fn holding_out_nothing_keeps_the_shards_of_a_run_that_never_scored() {
        let split = split_held_out(50, 0, 1);
        assert_eq!(split.training, (0..50).collect::<Vec<u32>>());
        assert!(split.held_out.is_empty());
    }

    #[test]
    fn an_epoch_visits_every_image_once() {
        let shard: Vec<u32> = (100..110).collect();
        let mut sampler = BatchSampler::new(1, 0, shard.clone(), SamplerState::default());
        let mut seen: Vec<u32> = (0..5).flat_map(|_| sampler.next_batch(2)).collect();
        seen.sort();
        assert_eq!(seen, shard);
        assert_eq!(sampler.state(), SamplerState { epoch: 0, cursor: 10 });
        // The next batch starts epoch 1 with a new order.
        sampler.next_batch(3);
        assert_eq!(sampler.state(), SamplerState { epoch: 1, cursor: 3 });
    }

    #[test]
    fn rewinding_across_an_epoch_draws_the_same_batches_again() {
        let mut sampler = BatchSampler::new(2, 0, (0..10).collect(), SamplerState::default());
        sampler.next_batch(8);
        let before = sampler.state();
        let first = sampler.next_batch(8); // crosses into epoch 1
        sampler.rewind(before);
        assert_eq!(sampler.next_batch(8), first);
    }

    #[test]
    fn resuming_from_a_state_draws_the_same_batches() {
        let shard: Vec<u32> = (0..37).collect();
        let mut straight = BatchSampler::new(4, 1, shard.clone(), SamplerState::default());
        for _ in 0..7 {
            straight.next_batch(16);
        }
        let mut resumed = BatchSampler::new(4, 1, shard, straight.state());
        for _ in 0..5 {
            assert_eq!(straight.next_batch(16), resumed.next_batch(16));
        }
    }
}
