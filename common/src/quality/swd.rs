//! Random projections of descriptors, their sorting, and the 1-D Wasserstein distance.

use super::patches::{ChannelStats, DIMS, PER_CHANNEL};
use crate::seeds;

/// Directions per kernel tile: two SSE registers' worth per row, so a 4x8 tile of sums stays
/// in registers on a plain x86-64 target.
const LANES: usize = 8;
/// Descriptors per kernel tile.
pub(crate) const ROWS: usize = 4;

/// Unit directions in descriptor space, with one level's normalisation folded in.
#[derive(Debug)]
pub(crate) struct Projector {
    directions: usize,
    /// Tiles of [`LANES`] directions; each tile `[DIMS][LANES]`, the directions past
    /// `directions` zero.
    weights: Vec<f32>,
    /// Per direction, minus the projection of the mean: projecting `(x - mean) / std` on `w`
    /// is projecting `x` on `w / std` plus this.
    bias: Vec<f32>,
}

impl Projector {
    /// `directions` unit vectors, Gaussian draws normalised (uniform on the sphere), from
    /// `stream` of `seed`; `stats` is the normalisation of the descriptors they will project.
    pub(crate) fn new(directions: usize, seed: u64, stream: u64, stats: &ChannelStats) -> Self {
        let mut rng = seeds::rng(seed);
        rng.set_stream(stream);
        let tiles = directions.div_ceil(LANES);
        let mut weights = vec![0.0f32; tiles * DIMS * LANES];
        let mut bias = vec![0.0f32; tiles * LANES];
        let mut w = [0.0f64; DIMS];
        for (d, bias) in bias.iter_mut().enumerate().take(directions) {
            for pair in w.chunks_mut(2) {
                // Box-Muller: two normal values from two uniform ones in (0, 1].
                let r = (-2.0 * (1.0 - f64::from(seeds::unit_f32(&mut rng))).ln()).sqrt();
                let angle = std::f64::consts::TAU * f64::from(seeds::unit_f32(&mut rng));
                pair[0] = r * angle.cos();
                if let Some(second) = pair.get_mut(1) {
                    *second = r * angle.sin();
                }
            }
            let norm = w.iter().map(|v| v * v).sum::<f64>().sqrt();
            let (tile, lane) = (d / LANES, d % LANES);
            let mut offset = 0.0f64;
            for (k, v) in w.iter().enumerate() {
                let c = k / PER_CHANNEL;
                let folded = v / norm / f64::from(stats.std[c]);
                weights[(tile * DIMS + k) * LANES + lane] = folded as f32;
                offset -= folded * f64::from(stats.mean[c]);
            }
            *bias = offset as f32;
        }
        Self {
            directions,
            weights,
            bias,
        }
    }

    pub(crate) fn directions(&self) -> usize {
        self.directions
    }

    /// Projects [`ROWS`] descriptors (`block`, `ROWS * DIMS` values) on every direction and
    /// writes descriptor `r`'s projection on direction `d` to `out[d * stride + first + r]`,
    /// for the first `rows` of them.
    pub(crate) fn project(&self, block: &[f32], rows: usize, out: &mut [f32], stride: usize, first: usize) {
        let block: &[f32; ROWS * DIMS] = block.try_into().expect("a block holds ROWS descriptors");
        for (tile, (weights, bias)) in self
            .weights
            .chunks_exact(DIMS * LANES)
            .zip(self.bias.chunks_exact(LANES))
            .enumerate()
        {
            let bias: &[f32; LANES] = bias.try_into().expect("a tile has LANES directions");
            let mut sums = [*bias; ROWS];
            for (k, w) in weights.chunks_exact(LANES).enumerate() {
                let w: &[f32; LANES] = w.try_into().expect("a tile row has LANES values");
                for (r, sum) in sums.iter_mut().enumerate() {
                    let x = block[r * DIMS + k];
                    for j in 0..LANES {
                        sum[j] += x * w[j];
                    }
                }
            }
            let lanes = LANES.min(self.directions - tile * LANES);
            for (r, sum) in sums.iter().enumerate().take(rows) {
                for (j, &v) in sum.iter().enumerate().take(lanes) {
                    out[(tile * LANES + j) * stride + first + r] = v;
                }
            }
        }
    }
}

/// An order-preserving map of finite f32 to u32: flip all bits of negatives, the sign of the rest.
fn key(v: f32) -> u32 {
    let b = v.to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

fn unkey(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7fff_ffff } else { !k })
}

/// Buffers for [`sort`].
#[derive(Debug, Default)]
pub(crate) struct SortScratch {
    keys: Vec<u32>,
    spare: Vec<u32>,
}

/// Sorts finite values ascending: a least-significant-digit radix sort over 11, 11 and 10 bits,
/// several times faster than a comparison sort on the tens of thousands of values per direction.
pub(crate) fn sort(values: &mut [f32], scratch: &mut SortScratch) {
    const BITS: [u32; 3] = [11, 11, 10];
    let SortScratch { keys, spare } = scratch;
    keys.clear();
    keys.extend(values.iter().map(|&v| key(v)));
    spare.clear();
    spare.resize(keys.len(), 0);
    let mut counts = [[0usize; 1 << 11]; 3];
    for &k in keys.iter() {
        counts[0][(k & 0x7ff) as usize] += 1;
        counts[1][((k >> 11) & 0x7ff) as usize] += 1;
        counts[2][(k >> 22) as usize] += 1;
    }
    let mut shift = 0;
    for (pass, bits) in BITS.iter().enumerate() {
        let mask = (1u32 << bits) - 1;
        let count = &mut counts[pass];
        // A digit every key shares moves nothing: skip the pass.
        if count.contains(&keys.len()) {
            shift += bits;
            continue;
        }
        let mut start = 0;
        for c in count.iter_mut() {
            let n = *c;
            *c = start;
            start += n;
        }
        for &k in keys.iter() {
            let digit = ((k >> shift) & mask) as usize;
            spare[count[digit]] = k;
            count[digit] += 1;
        }
        std::mem::swap(keys, spare);
        shift += bits;
    }
    for (v, &k) in values.iter_mut().zip(keys.iter()) {
        *v = unkey(k);
    }
}

/// The Wasserstein-1 distance between two empirical distributions given sorted: the mean
/// absolute difference of their quantile functions. With equal counts that is the mean of
/// `|a[i] - b[i]|`; otherwise the quantile functions are walked over the merged steps
/// `i / a.len()` and `j / b.len()`.
pub(crate) fn wasserstein_sorted(a: &[f32], b: &[f32]) -> f64 {
    if a.len() == b.len() {
        return mean_abs_difference(a, b);
    }
    let (na, nb) = (a.len() as u64, b.len() as u64);
    // Positions in units of 1 / (na * nb): a's step i ends at (i + 1) * nb, b's step j at (j + 1) * na.
    let (mut i, mut j, mut at, mut total) = (0usize, 0usize, 0u64, 0.0f64);
    while i < a.len() && j < b.len() {
        let (end_a, end_b) = ((i as u64 + 1) * nb, (j as u64 + 1) * na);
        let end = end_a.min(end_b);
        total += (end - at) as f64 * f64::from((a[i] - b[j]).abs());
        at = end;
        if end == end_a {
            i += 1;
        }
        if end == end_b {
            j += 1;
        }
    }
    total / (na * nb) as f64
}

/// The mean of `|a[i] - b[i]|`, in independent lanes so it vectorises, each block of lanes
/// carried into an f64 total.
fn mean_abs_difference(a: &[f32], b: &[f32]) -> f64 {
    const WIDTH: usize = 16;
    let mut total = 0.0f64;
    for (a, b) in a.chunks(1024).zip(b.chunks(1024)) {
        let mut lanes = [0.0f32; WIDTH];
        let (ca, cb) = (a.chunks_exact(WIDTH), b.chunks_exact(WIDTH));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for j in 0..WIDTH {
                lanes[j] += (x[j] - y[j]).abs();
            }
        }
        total += lanes.iter().map(|&v| f64::from(v)).sum::<f64>();
        total += ra.iter().zip(rb).map(|(x, y)| f64::from((x - y).abs())).sum::<f64>();
    }
    total / a.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radix_sort_matches_the_standard_sort() {
        let mut rng = seeds::rng(3);
        let mut values: Vec<f32> = (0..5000).map(|_| (seeds::unit_f32(&mut rng) - 0.5) * 1e4).collect();
        values.extend([0.0, -0.0, 1e-30, -1e-30, f32::MAX, f32::MIN, 3.0, 3.0]);
        let mut want = values.clone();
        want.sort_by(f32::total_cmp);
        sort(&mut values, &mut SortScratch::default());
        assert_eq!(values, want);
        let mut few = vec![2.0f32, 1.0];
        sort(&mut few, &mut SortScratch::default());
        assert_eq!(few, [1.0, 2.0]);
    }

    #[test]
    fn equal_counts_give_the_mean_absolute_difference() {
        let a: Vec<f32> = (0..1037).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..1037).map(|i| i as f32 + 0.5).collect();
        assert!((wasserstein_sorted(&a, &b) - 0.5).abs() < 1e-9);
        assert_eq!(wasserstein_sorted(&a, &a), 0.0);
    }

    #[test]
    fn unequal_counts_match_quantiles() {
        // {0, 1} against {0, 0, 1, 1}: the same distribution.
        assert_eq!(wasserstein_sorted(&[0.0, 1.0], &[0.0, 0.0, 1.0, 1.0]), 0.0);
        // {0} against {0, 1}: half the mass moves by 1.
        assert!((wasserstein_sorted(&[0.0], &[0.0, 1.0]) - 0.5).abs() < 1e-12);
        // {0, 3} against {1, 2, 6}: steps at 1/3, 1/2, 2/3 give 1/3*1 + 1/6*2 + 1/6*1 + 1/3*3.
        let want = 1.0 / 3.0 + 2.0 / 6.0 + 1.0 / 6.0 + 1.0;
        assert!((wasserstein_sorted(&[0.0, 3.0], &[1.0, 2.0, 6.0]) - want).abs() < 1e-12);
    }

    #[test]
    fn projections_are_of_unit_directions_after_normalisation() {
        let stats = ChannelStats {
            mean: [10.0, 20.0, 30.0],
            std: [2.0, 4.0, 8.0],
        };
        let directions = 13;
        let p = Projector::new(directions, 5, 1, &stats);
        let plain = Projector::new(
            directions,
            5,
            1,
            &ChannelStats {
                mean: [0.0; 3],
                std: [1.0; 3],
            },
        );
        let mut rng = seeds::rng(8);
        let raw: Vec<f32> = (0..ROWS * DIMS).map(|_| seeds::unit_f32(&mut rng) * 50.0).collect();
        let normalised: Vec<f32> = raw
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let c = (i % DIMS) / PER_CHANNEL;
                (v - stats.mean[c]) / stats.std[c]
            })
            .collect();
        let (mut a, mut b) = (vec![0.0; directions * 5], vec![0.0; directions * 5]);
        p.project(&raw, 3, &mut a, 5, 1);
        plain.project(&normalised, 3, &mut b, 5, 1);
        for d in 0..directions {
            assert_eq!(a[d * 5], 0.0, "column 0 is not written");
            assert_eq!(a[d * 5 + 4], 0.0, "row 3 is left out");
            for r in 1..4 {
                assert!(
                    (a[d * 5 + r] - b[d * 5 + r]).abs() < 1e-3,
                    "{} vs {}",
                    a[d * 5 + r],
                    b[d * 5 + r]
                );
            }
        }
        // A unit direction: projecting the descriptor e_k gives weight k; the squares sum to 1.
        let mut norm = 0.0;
        for k in 0..DIMS {
            let mut e = vec![0.0; ROWS * DIMS];
            e[k] = 1.0;
            let mut out = vec![0.0; directions];
            plain.project(&e, 1, &mut out, 1, 0);
            norm += out[0] * out[0];
        }
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
}
