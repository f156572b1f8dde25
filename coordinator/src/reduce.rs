//! The all-reduce, streamed: every shard's gradient chunks are summed into one buffer as they
//! arrive, so a chunk that every shard has delivered can be applied and broadcast while later
//! chunks are still on the wire.
//!
//! The sum of each chunk is taken in shard order, with the weights of
//! `forger_common::average::weighted_average`, so the mean has the same bits as that function
//! gives on whole buffers (the single-process loop uses it). A chunk that arrives before its
//! turn (shard 2's chunk 0 before shard 1's) is held, as the received bytes, until its turn
//! comes. So the coordinator keeps one reduce buffer per network, plus whatever early chunks
//! uneven workers leave waiting, instead of one buffer per shard.
//!
//! The last part of each chunk (in shard order) is not added here but handed to a [`Finish`],
//! so the trainer can fold it into the same pass as RMSProp (`forger_common::chunk_update`);
//! [`KeepMean`] just adds it, leaving the mean in the buffer.
//!
//! A part is one upload: one shard's gradient, or a group's, from a worker with several
//! replicas that summed its shards' gradients itself (their sample-weighted mean, in shard
//! order). A group weighs its samples' share of the phase and takes its turn at its first
//! shard; each of its shards' batch-norm statistics still counts on its own.

use std::ops::Range;

use bytes::Bytes;
use forger_common::average::weighted_average;
use forger_common::chunk_update::LastPart;
use forger_common::compression::GradientCompression;
use forger_common::wire::CHUNK_VALUES;

/// Why a chunk was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkError {
    OutOfOrder {
        expected: usize,
        found: usize,
    },
    WrongSize {
        chunk: usize,
        expected: usize,
        found: usize,
    },
    Misaligned,
    LastFlag {
        chunk: usize,
        chunks: usize,
    },
    AfterEnd,
    NotAveraged,
    FinalChunk {
        samples: u32,
        expected_samples: u32,
        bn: usize,
        expected_bn: usize,
    },
    /// A group's first chunk lists other shards (or samples, or statistics) than its part
    /// covers, or a chunk names a group where none belongs.
    Group {
        expected: Vec<(u32, u32)>,
        found: Vec<(u32, u32)>,
    },
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChunkError::OutOfOrder { expected, found } => {
                write!(f, "chunk starts at element {found}, expected {expected}")
            }
            ChunkError::WrongSize { chunk, expected, found } => {
                write!(f, "chunk {chunk} holds {found} values, expected {expected}")
            }
            ChunkError::Misaligned => write!(f, "chunk is not a whole number of values"),
            ChunkError::LastFlag { chunk, chunks } => {
                write!(f, "chunk {chunk} of {chunks} carries the wrong `last` flag")
            }
            ChunkError::AfterEnd => write!(f, "chunk after the final one"),
            ChunkError::NotAveraged => write!(f, "shard is not part of this phase's average"),
            ChunkError::FinalChunk {
                samples,
                expected_samples,
                bn,
                expected_bn,
            } => write!(
                f,
                "final chunk has {samples} samples and {bn} batch-norm values \
                 (expected {expected_samples} and {expected_bn})"
            ),
            ChunkError::Group { expected, found } if expected.is_empty() => write!(
                f,
                "chunk names the group (shard, samples) {found:?}, which only a group's first chunk lists"
            ),
            ChunkError::Group { expected, found } if expected.len() == 1 => write!(
                f,
                "chunk names the group (shard, samples) {found:?}, but this upload is one shard's gradient"
            ),
            ChunkError::Group { expected, found } => write!(
                f,
                "group gradient covers (shard, samples) {found:?} (with batch-norm statistics of the wrong \
                 length, if equal), expected {expected:?}: the shards this worker holds that the phase averages"
            ),
        }
    }
}

/// What taking a chunk came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Summed or held; `complete_chunks` may have grown.
    Ok,
    /// The shard's gradient holds a NaN or an infinity (or its batch-norm statistics do): one
    /// such value would spread through the mean into every parameter.
    NonFinite { shard: u32 },
}

/// What becomes of a chunk when its last part arrives.
pub trait Finish {
    /// `sum` holds the weighted sum of chunk `chunk`'s earlier parts (nothing when
    /// `part.first`); returns false if a value of `part` is not finite.
    fn finish(&mut self, chunk: usize, sum: &mut [f32], part: LastPart<'_>, compression: GradientCompression) -> bool;
}

/// Adds the last part like the others, so that [`StreamingMean::mean`] reads the mean.
#[derive(Debug, Clone, Copy)]
pub struct KeepMean;

impl Finish for KeepMean {
    fn finish(&mut self, _: usize, sum: &mut [f32], part: LastPart<'_>, compression: GradientCompression) -> bool {
        compression.add_weighted(sum, part.bytes, part.weight, part.first)
    }
}

/// One shard of a group's first chunk, as the worker described it.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupShard {
    pub shard: u32,
    pub samples: u32,
    pub bn_stats: Vec<f32>,
    /// The worker found a value in this shard's gradient that is not finite.
    pub non_finite: bool,
}

/// One chunk of an upload, as it arrived.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The shard of a one-shard upload, or a group's first shard.
    pub shard: u32,
    pub offset: usize,
    pub bytes: Bytes,
    pub last: bool,
    /// With the final chunk: the upload's samples and (one shard's) batch-norm statistics.
    pub samples: u32,
    pub bn_stats: Vec<f32>,
    /// With a group's first chunk: every shard it covers, in shard order.
    pub group: Vec<GroupShard>,
}

/// One upload's part of the phase: one shard, or a worker's group of shards.
#[derive(Debug)]
struct Part {
    /// The shards it covers, in shard order, with their samples.
    shards: Vec<(u32, u32)>,
    /// Their total.
    samples: u32,
    weight: f32,
    /// Chunks received so far (they arrive in order).
    received: usize,
    /// Chunks received before their turn in the sum, by chunk index.
    early: Vec<Option<Bytes>>,
    /// Each shard's batch-norm statistics, once they arrived.
    bn_stats: Vec<Option<Vec<f32>>>,
}

impl Part {
    fn first_shard(&self) -> u32 {
        self.shards[0].0
    }

    fn is_group(&self) -> bool {
        self.shards.len() > 1
    }
}

/// The sample-weighted mean of one network's gradient over a phase's shards.
#[derive(Debug)]
pub struct StreamingMean {
    len: usize,
    bn_len: usize,
    /// How the values arrive.
    compression: GradientCompression,
    parts: Vec<Part>,
    sum: Vec<f32>,
    /// Per chunk, how many parts (in shard order) its sum holds.
    summed: Vec<usize>,
    /// Chunks finished over every part: a prefix, since each part sends in order.
    complete: usize,
}

impl StreamingMean {
    pub fn new(len: usize, bn_len: usize, compression: GradientCompression) -> Self {
        let chunks = chunk_count(len);
        StreamingMean {
            len,
            bn_len,
            compression,
            parts: Vec::new(),
            sum: vec![0.0; len],
            summed: vec![0; chunks],
            complete: 0,
        }
    }

    /// Starts a phase averaging `shards` (shard, samples), one upload each, in the order given,
    /// keeping the buffer.
    pub fn begin(&mut self, shards: &[(u32, u32)]) {
        let parts: Vec<Vec<(u32, u32)>> = shards.iter().map(|&s| vec![s]).collect();
        self.begin_parts(&parts);
    }

    /// Starts a phase whose uploads each cover the shards (shard, samples) of one entry of
    /// `parts`: one shard, or a group in shard order. Parts are summed in the order given,
    /// which is the order of their first shards.
    pub fn begin_parts(&mut self, parts: &[Vec<(u32, u32)>]) {
        let total: u64 = parts.iter().flatten().map(|&(_, n)| u64::from(n)).sum();
        let chunks = self.summed.len();
        self.parts = parts
            .iter()
            .map(|shards| {
                assert!(!shards.is_empty(), "a part covers at least one shard");
                let samples: u32 = shards.iter().map(|&(_, n)| n).sum();
                Part {
                    shards: shards.clone(),
                    samples,
                    // As `weighted_average` weighs, so the bits agree for one-shard parts; a
                    // group's share is its samples' share, which is the sum of its shards'.
                    weight: (f64::from(samples) / total.max(1) as f64) as f32,
                    received: 0,
                    early: vec![None; chunks],
                    bn_stats: vec![None; shards.len()],
                }
            })
            .collect();
        // The sum's chunks are zeroed as their first part arrives (`add`).
        self.summed.fill(0);
        self.complete = 0;
    }

    pub fn chunks(&self) -> usize {
        self.summed.len()
    }

    /// Chunks whose mean is final, counted from the first.
    pub fn complete_chunks(&self) -> usize {
        self.complete
    }

    pub fn is_complete(&self) -> bool {
        self.complete == self.chunks()
    }

    /// The uploads still sending, by their (first) shard, in shard order.
    pub fn unfinished(&self) -> impl Iterator<Item = u32> + '_ {
        let chunks = self.chunks();
        self.parts
            .iter()
            .filter(move |p| p.received < chunks)
            .map(Part::first_shard)
    }

    /// How many uploads the phase takes in.
    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    /// The element range of chunk `c`.
    pub fn range(&self, c: usize) -> Range<usize> {
        chunk_range(c, self.len)
    }

    /// The mean over `range`, final once its chunks are complete (with [`KeepMean`]; another
    /// [`Finish`] may have left something else there).
    pub fn mean(&self, range: Range<usize>) -> &[f32] {
        &self.sum[range]
    }

    /// Exchanges the whole sum buffer with `other` (of the same length): the trainer keeps
    /// the mean square its [`Finish`] left there and hands back a buffer to sum into next.
    pub fn swap_sum(&mut self, other: &mut Vec<f32>) {
        assert_eq!(other.len(), self.sum.len(), "a buffer of another length");
        std::mem::swap(&mut self.sum, other);
    }

    /// Takes one chunk of `shard`'s one-shard upload: [`StreamingMean::take`] without a group
    /// (for the tests, which mostly send one-shard uploads).
    #[cfg(test)]
    pub fn accept(
        &mut self,
        shard: u32,
        offset: usize,
        bytes: Bytes,
        last: bool,
        final_part: (u32, Vec<f32>),
        finish: &mut impl Finish,
    ) -> Result<Taken, ChunkError> {
        let (samples, bn_stats) = final_part;
        let chunk = Chunk {
            shard,
            offset,
            bytes,
            last,
            samples,
            bn_stats,
            group: Vec::new(),
        };
        self.take(chunk, finish)
    }

    /// Takes one chunk of an upload, encoded as the job's `gradient_compression` says; each
    /// chunk whose last part it completes goes to `finish`, in chunk order. Chunks of an upload
    /// must arrive in order, cut at `CHUNK_VALUES`, the final one flagged and carrying the
    /// samples and, for one shard, its batch-norm statistics. A group's first chunk lists its
    /// shards, exactly those of its part, with their samples and statistics.
    pub fn take(&mut self, chunk: Chunk, finish: &mut impl Finish) -> Result<Taken, ChunkError> {
        let Chunk {
            shard,
            offset,
            bytes,
            last,
            samples,
            bn_stats,
            group,
        } = chunk;
        let chunks = self.chunks();
        let bn_len = self.bn_len;
        let position = self
            .parts
            .iter()
            .position(|p| p.first_shard() == shard)
            .ok_or(ChunkError::NotAveraged)?;
        let part = &mut self.parts[position];
        let c = part.received;
        if c == chunks {
            return Err(ChunkError::AfterEnd);
        }
        let range = chunk_range(c, self.len);
        if offset != range.start {
            return Err(ChunkError::OutOfOrder {
                expected: range.start,
                found: offset,
            });
        }
        let value_bytes = self.compression.value_bytes();
        if !bytes.len().is_multiple_of(value_bytes) {
            return Err(ChunkError::Misaligned);
        }
        let count = bytes.len() / value_bytes;
        if count != range.len() {
            return Err(ChunkError::WrongSize {
                chunk: c,
                expected: range.len(),
                found: count,
            });
        }
        if last != (c + 1 == chunks) {
            return Err(ChunkError::LastFlag { chunk: c, chunks });
        }
        let listed: Vec<(u32, u32)> = group.iter().map(|g| (g.shard, g.samples)).collect();
        let group_expected = c == 0 && part.is_group();
        if (group_expected && (listed != part.shards || group.iter().any(|g| g.bn_stats.len() != bn_len)))
            || (!group_expected && !group.is_empty())
        {
            return Err(ChunkError::Group {
                expected: if c == 0 { part.shards.clone() } else { Vec::new() },
                found: listed,
            });
        }
        for (i, g) in group.into_iter().enumerate() {
            if g.non_finite || !g.bn_stats.iter().all(|v| v.is_finite()) {
                return Ok(Taken::NonFinite { shard: g.shard });
            }
            part.bn_stats[i] = Some(g.bn_stats);
        }
        if last {
            // A group's statistics came per shard with its first chunk.
            let expected_bn = if part.is_group() { 0 } else { bn_len };
            if samples != part.samples || bn_stats.len() != expected_bn {
                return Err(ChunkError::FinalChunk {
                    samples,
                    expected_samples: part.samples,
                    bn: bn_stats.len(),
                    expected_bn,
                });
            }
            if !part.is_group() {
                if !bn_stats.iter().all(|v| v.is_finite()) {
                    return Ok(Taken::NonFinite { shard });
                }
                part.bn_stats[0] = Some(bn_stats);
            }
        }
        part.received += 1;
        if self.summed[c] != position {
            self.parts[position].early[c] = Some(bytes);
            return Ok(Taken::Ok);
        }
        if !self.add(position, c, &bytes, finish) {
            return Ok(Taken::NonFinite { shard });
        }
        // Later shards' chunks that were waiting for this one.
        while let Some(next) = self.parts.get_mut(self.summed[c]).and_then(|p| p.early[c].take()) {
            let next_position = self.summed[c];
            if !self.add(next_position, c, &next, finish) {
                return Ok(Taken::NonFinite {
                    shard: self.parts[next_position].first_shard(),
                });
            }
        }
        while self.complete < chunks && self.summed[self.complete] == self.parts.len() {
            self.complete += 1;
        }
        Ok(Taken::Ok)
    }

    /// Adds one part's chunk to the sum, or hands it to `finish` when it is the chunk's last;
    /// false if it holds a value that is not finite. The sum is not zeroed between phases: the
    /// first part is written over whatever the buffer holds.
    fn add(&mut self, position: usize, c: usize, bytes: &[u8], finish: &mut impl Finish) -> bool {
        let range = chunk_range(c, self.len);
        let part = LastPart {
            bytes,
            weight: self.parts[position].weight,
            first: self.summed[c] == 0,
        };
        let sum = &mut self.sum[range];
        let finite = if position + 1 == self.parts.len() {
            finish.finish(c, sum, part, self.compression)
        } else {
            self.compression.add_weighted(sum, part.bytes, part.weight, part.first)
        };
        self.summed[c] += 1;
        finite
    }

    /// The sample-weighted mean of every shard's batch-norm statistics, in shard order (a
    /// group's shards count one by one, so grouping does not change it); call once every chunk
    /// is complete.
    pub fn bn_mean(&self) -> Vec<f32> {
        let mut by_shard: Vec<(u32, &[f32], u32)> = self
            .parts
            .iter()
            .flat_map(|p| {
                p.shards
                    .iter()
                    .zip(&p.bn_stats)
                    .map(|(&(shard, samples), stats)| (shard, stats.as_deref().unwrap_or(&[]), samples))
            })
            .collect();
        by_shard.sort_by_key(|&(shard, _, _)| shard);
        let stats: Vec<(&[f32], u32)> = by_shard.iter().map(|&(_, stats, n)| (stats, n)).collect();
        let mut mean = vec![0.0; self.bn_len];
        weighted_average(&stats, &mut mean);
        mean
    }
}

/// How many chunks a buffer of `len` values travels in (at least one, so an empty final chunk
/// still carries the batch-norm statistics).
pub fn chunk_count(len: usize) -> usize {
    len.div_ceil(CHUNK_VALUES).max(1)
}

/// The element range of chunk `c` of a buffer of `len` values.
pub fn chunk_range(c: usize, len: usize) -> Range<usize> {
    (c * CHUNK_VALUES).min(len)..((c + 1) * CHUNK_VALUES).min(len)
}

#[cfg(test)]
mod tests;
