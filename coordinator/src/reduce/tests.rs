use super::*;
use forger_common::wire;

/// Values whose sums depend on the order they are added in.
fn values(seed: u32, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (x % 20_001) as f32 * 1e-3 - 10.0 + seed as f32 * 1e-7
        })
        .collect()
}

fn chunk(values: &[f32], c: usize) -> (usize, Bytes, bool) {
    let range = chunk_range(c, values.len());
    let last = c + 1 == chunk_count(values.len());
    (range.start, wire::f32_bytes(&values[range]), last)
}

const BN: usize = 3;

fn bn(seed: u32) -> Vec<f32> {
    vec![seed as f32; BN]
}

/// Feeds chunks in the given (shard, chunk) order and returns the whole mean.
fn stream(grads: &[Vec<f32>], samples: &[u32], order: &[(u32, usize)]) -> (Vec<f32>, Vec<f32>) {
    let len = grads[0].len();
    let mut mean = StreamingMean::new(len, BN, GradientCompression::None);
    let shards: Vec<(u32, u32)> = (0..grads.len() as u32).zip(samples.iter().copied()).collect();
    mean.begin(&shards);
    let mut completed = 0;
    for &(shard, c) in order {
        let (offset, bytes, last) = chunk(&grads[shard as usize], c);
        let final_part = (samples[shard as usize], if last { bn(shard) } else { Vec::new() });
        let taken = mean
            .accept(shard, offset, bytes, last, final_part, &mut KeepMean)
            .unwrap();
        assert_eq!(taken, Taken::Ok);
        assert!(mean.complete_chunks() >= completed, "complete chunks only grow");
        completed = mean.complete_chunks();
    }
    assert!(mean.is_complete());
    (mean.mean(0..len).to_vec(), mean.bn_mean())
}

#[test]
fn any_arrival_order_gives_the_bits_of_the_shard_order_mean() {
    let len = 2 * CHUNK_VALUES + 1000; // three chunks, the last one short
    let grads: Vec<Vec<f32>> = (0..3).map(|s| values(s + 1, len)).collect();
    let samples = [16, 16, 8];
    let mut expected = vec![0.0; len];
    let weighted: Vec<(&[f32], u32)> = grads.iter().map(Vec::as_slice).zip(samples).collect();
    weighted_average(&weighted, &mut expected);
    let mut reversed = vec![0.0; len];
    let backwards: Vec<(&[f32], u32)> = weighted.iter().rev().copied().collect();
    weighted_average(&backwards, &mut reversed);
    assert_ne!(expected, reversed, "the test values are order-sensitive");

    let in_order: Vec<(u32, usize)> = (0..3).flat_map(|s| (0..3).map(move |c| (s, c))).collect();
    let last_shard_first: Vec<(u32, usize)> = [2, 1, 0].iter().flat_map(|&s| (0..3).map(move |c| (s, c))).collect();
    let interleaved = vec![(1, 0), (2, 0), (1, 1), (0, 0), (2, 1), (0, 1), (0, 2), (2, 2), (1, 2)];
    for order in [in_order, last_shard_first, interleaved] {
        let (mean, bn_mean) = stream(&grads, &samples, &order);
        assert!(
            mean == expected,
            "streamed mean equals weighted_average bit for bit ({order:?})"
        );
        assert_eq!(bn_mean, vec![(0.0 * 16.0 + 1.0 * 16.0 + 2.0 * 8.0) / 40.0; BN]);
    }
}

#[test]
fn a_chunk_completes_only_when_every_shard_delivered_it() {
    let len = CHUNK_VALUES + 10;
    let grads: Vec<Vec<f32>> = (0..2).map(|s| values(s, len)).collect();
    let mut mean = StreamingMean::new(len, BN, GradientCompression::None);
    mean.begin(&[(0, 4), (1, 4)]);
    let (o, b, l) = chunk(&grads[1], 0);
    mean.accept(1, o, b, l, (4, Vec::new()), &mut KeepMean).unwrap();
    assert_eq!(mean.complete_chunks(), 0, "shard 1 waits for shard 0");
    let (o, b, l) = chunk(&grads[0], 0);
    mean.accept(0, o, b, l, (4, Vec::new()), &mut KeepMean).unwrap();
    assert_eq!(mean.complete_chunks(), 1);
    assert_eq!(mean.unfinished().collect::<Vec<_>>(), vec![0, 1]);
    let (o, b, l) = chunk(&grads[0], 1);
    mean.accept(0, o, b, l, (4, bn(0)), &mut KeepMean).unwrap();
    assert_eq!(mean.unfinished().collect::<Vec<_>>(), vec![1]);
    assert!(!mean.is_complete());
}

#[test]
fn a_non_finite_value_names_its_shard_even_when_it_waited_for_its_turn() {
    let len = 100;
    let good = values(1, len);
    let mut bad = values(2, len);
    bad[7] = f32::INFINITY;
    let mut mean = StreamingMean::new(len, BN, GradientCompression::None);
    mean.begin(&[(0, 2), (1, 2)]);
    // Shard 1's chunk arrives first and is held; it is checked when summed.
    let (o, b, l) = chunk(&bad, 0);
    assert_eq!(mean.accept(1, o, b, l, (2, bn(1)), &mut KeepMean).unwrap(), Taken::Ok);
    let (o, b, l) = chunk(&good, 0);
    assert_eq!(
        mean.accept(0, o, b, l, (2, bn(0)), &mut KeepMean).unwrap(),
        Taken::NonFinite { shard: 1 }
    );

    mean.begin(&[(0, 2)]);
    let (o, b, l) = chunk(&good, 0);
    assert_eq!(
        mean.accept(0, o, b, l, (2, vec![f32::NAN; BN]), &mut KeepMean).unwrap(),
        Taken::NonFinite { shard: 0 },
        "batch-norm statistics are checked too"
    );
}

#[test]
fn malformed_uploads_are_refused() {
    let len = CHUNK_VALUES + 4;
    let g = values(3, len);
    let mut mean = StreamingMean::new(len, BN, GradientCompression::None);
    mean.begin(&[(0, 2)]);
    let (_, first, _) = chunk(&g, 0);
    let (_, second, _) = chunk(&g, 1);
    assert_eq!(
        mean.accept(0, 4, first.clone(), false, (2, vec![]), &mut KeepMean),
        Err(ChunkError::OutOfOrder { expected: 0, found: 4 })
    );
    assert_eq!(
        mean.accept(0, 0, first.slice(0..8), false, (2, vec![]), &mut KeepMean),
        Err(ChunkError::WrongSize {
            chunk: 0,
            expected: CHUNK_VALUES,
            found: 2
        })
    );
    assert_eq!(
        mean.accept(0, 0, first.slice(0..6), false, (2, vec![]), &mut KeepMean),
        Err(ChunkError::Misaligned)
    );
    assert_eq!(
        mean.accept(0, 0, first.clone(), true, (2, bn(0)), &mut KeepMean),
        Err(ChunkError::LastFlag { chunk: 0, chunks: 2 })
    );
    assert_eq!(
        mean.accept(5, 0, first.clone(), false, (2, vec![]), &mut KeepMean),
        Err(ChunkError::NotAveraged)
    );
    mean.accept(0, 0, first.clone(), false, (2, vec![]), &mut KeepMean)
        .unwrap();
    assert_eq!(
        mean.accept(0, CHUNK_VALUES, second.clone(), true, (3, bn(0)), &mut KeepMean),
        Err(ChunkError::FinalChunk {
            samples: 3,
            expected_samples: 2,
            bn: BN,
            expected_bn: BN
        })
    );
    mean.accept(0, CHUNK_VALUES, second.clone(), true, (2, bn(0)), &mut KeepMean)
        .unwrap();
    assert!(mean.is_complete());
    assert_eq!(
        mean.accept(0, CHUNK_VALUES, second, true, (2, bn(0)), &mut KeepMean),
        Err(ChunkError::AfterEnd)
    );
}

#[test]
fn bf16_chunks_give_the_bits_of_the_mean_of_what_they_decode_to() {
    use forger_common::compression::{ErrorFeedback, widen_all};
    let len = CHUNK_VALUES + 77;
    let samples = [16u32, 12];
    let sent: Vec<_> = (0..2)
        .map(|s| ErrorFeedback::new(len).compress(1, &values(s + 1, len)))
        .collect();
    let decoded: Vec<Vec<f32>> = sent.iter().map(|v| widen_all(v)).collect();
    let mut expected = vec![0.0; len];
    let weighted: Vec<(&[f32], u32)> = decoded.iter().map(Vec::as_slice).zip(samples).collect();
    weighted_average(&weighted, &mut expected);

    let mut mean = StreamingMean::new(len, BN, GradientCompression::Bf16);
    mean.begin(&[(0, samples[0]), (1, samples[1])]);
    // Shard 1 first, so its chunks wait for shard 0's.
    for shard in [1u32, 0] {
        let bytes = Bytes::from(sent[shard as usize].clone());
        for c in 0..chunk_count(len) {
            let range = chunk_range(c, len);
            let last = c + 1 == chunk_count(len);
            let final_part = (samples[shard as usize], if last { bn(shard) } else { Vec::new() });
            let chunk = bytes.slice(range.start * 2..range.end * 2);
            assert_eq!(
                mean.accept(shard, range.start, chunk, last, final_part, &mut KeepMean),
                Ok(Taken::Ok)
            );
        }
    }
    assert!(mean.is_complete());
    assert_eq!(mean.mean(0..len), expected.as_slice());

    // An f32 chunk sent to a bf16 job is twice the size: refused, naming the chunk.
    mean.begin(&[(0, 16)]);
    let (offset, bytes, _) = chunk(&values(1, len), 0);
    let err = mean
        .accept(0, offset, bytes, false, (16, Vec::new()), &mut KeepMean)
        .unwrap_err();
    assert_eq!(
        err,
        ChunkError::WrongSize {
            chunk: 0,
            expected: CHUNK_VALUES,
            found: 2 * CHUNK_VALUES
        }
    );
}

/// A group's first chunk as its worker sends it.
fn group_chunk(values: &[f32], c: usize, first: u32, members: &[(u32, u32)], total: u32) -> Chunk {
    let (offset, bytes, last) = chunk(values, c);
    Chunk {
        shard: first,
        offset,
        bytes,
        last,
        samples: if last { total } else { 0 },
        bn_stats: Vec::new(),
        group: if c == 0 {
            members
                .iter()
                .map(|&(shard, samples)| GroupShard {
                    shard,
                    samples,
                    bn_stats: bn(shard),
                    non_finite: false,
                })
                .collect()
        } else {
            Vec::new()
        },
    }
}

#[test]
fn a_group_summed_by_its_worker_reduces_to_the_per_shard_mean_within_rounding() {
    let len = 2 * CHUNK_VALUES + 500;
    let samples = [16u32, 8, 16, 12, 16];
    let grads: Vec<Vec<f32>> = (0..5).map(|s| values(s + 1, len)).collect();
    let per_shard: Vec<(&[f32], u32)> = grads.iter().map(Vec::as_slice).zip(samples).collect();
    let mut expected = vec![0.0; len];
    weighted_average(&per_shard, &mut expected);

    // Shards 0, 2 and 3 are one worker's replicas' (summed there, in shard order); 1 and 4
    // come from workers of one replica each.
    let members = [(0u32, 16u32), (2, 16), (3, 12)];
    let group_total: u32 = members.iter().map(|&(_, n)| n).sum();
    let mut local = vec![0.0; len];
    let own: Vec<(&[f32], u32)> = members
        .iter()
        .map(|&(s, n)| (grads[s as usize].as_slice(), n))
        .collect();
    weighted_average(&own, &mut local);

    let mut mean = StreamingMean::new(len, BN, GradientCompression::None);
    mean.begin_parts(&[members.to_vec(), vec![(1, 8)], vec![(4, 16)]]);
    assert_eq!(mean.parts(), 3, "three uploads instead of five");
    let weights: Vec<f32> = mean.parts.iter().map(|p| p.weight).collect();
    let total: f32 = weights.iter().sum();
    assert!((total - 1.0).abs() < 1e-6, "the weights add up to {total}");
    assert_eq!(
        weights[0],
        (f64::from(group_total) / 68.0) as f32,
        "a group weighs its samples"
    );
    let shard_weights: f32 = members.iter().map(|&(_, n)| (f64::from(n) / 68.0) as f32).sum();
    assert!(
        (weights[0] - shard_weights).abs() < 1e-6,
        "and its shards' weights together"
    );

    // The group's chunks arrive after the others', so they wait for nothing and the others
    // wait for them.
    for c in 0..chunk_count(len) {
        for shard in [4u32, 1] {
            let (offset, bytes, last) = chunk(&grads[shard as usize], c);
            let final_part = (samples[shard as usize], if last { bn(shard) } else { Vec::new() });
            assert_eq!(
                mean.accept(shard, offset, bytes, last, final_part, &mut KeepMean),
                Ok(Taken::Ok)
            );
        }
    }
    assert_eq!(mean.complete_chunks(), 0, "the group's turn comes first");
    for c in 0..chunk_count(len) {
        let taken = mean.take(group_chunk(&local, c, 0, &members, group_total), &mut KeepMean);
        assert_eq!(taken, Ok(Taken::Ok));
    }
    assert!(mean.is_complete());
    let reduced = mean.mean(0..len);
    let mut differ = 0;
    for i in 0..len {
        // f32 rounding of a few products and sums: bounded by the terms' magnitudes.
        let scale: f32 = per_shard.iter().map(|(g, n)| g[i].abs() * *n as f32 / 68.0).sum();
        let error = (reduced[i] - expected[i]).abs();
        assert!(
            error <= 1e-6 * scale,
            "element {i}: {} against {} (scale {scale})",
            reduced[i],
            expected[i]
        );
        differ += usize::from(reduced[i] != expected[i]);
    }
    assert!(differ > 0, "summing in groups changes the rounding, somewhere");
    // Batch-norm statistics count shard by shard, so grouping does not change them at all.
    let bn_expected: Vec<f32> = {
        let stats: Vec<Vec<f32>> = (0..5).map(bn).collect();
        let weighted: Vec<(&[f32], u32)> = stats.iter().map(Vec::as_slice).zip(samples).collect();
        let mut out = vec![0.0; BN];
        weighted_average(&weighted, &mut out);
        out
    };
    assert_eq!(mean.bn_mean(), bn_expected);
}

#[test]
fn a_group_must_list_exactly_its_shards_on_its_first_chunk() {
    let len = CHUNK_VALUES + 8;
    let g = values(9, len);
    let members = [(0u32, 2u32), (2, 2)];
    let fresh = || {
        let mut mean = StreamingMean::new(len, BN, GradientCompression::None);
        mean.begin_parts(&[members.to_vec(), vec![(1, 2)]]);
        mean
    };
    // Naming a shard its worker does not hold (1 is another's), or wrong samples.
    for wrong in [
        vec![(0u32, 2u32), (1, 2)],
        vec![(0, 2), (2, 3)],
        vec![(0, 2)],
        Vec::new(),
    ] {
        let mut mean = fresh();
        let found = mean.take(group_chunk(&g, 0, 0, &wrong, 4), &mut KeepMean);
        assert_eq!(
            found,
            Err(ChunkError::Group {
                expected: members.to_vec(),
                found: wrong.clone()
            })
        );
    }
    // A chunk naming the group's second shard is no upload of this phase.
    let mut mean = fresh();
    assert_eq!(
        mean.take(group_chunk(&g, 0, 2, &members, 4), &mut KeepMean),
        Err(ChunkError::NotAveraged)
    );
    // The list belongs on the first chunk only, and never on a one-shard upload.
    let mut mean = fresh();
    mean.take(group_chunk(&g, 0, 0, &members, 4), &mut KeepMean).unwrap();
    let mut second = group_chunk(&g, 1, 0, &members, 4);
    second.group = group_chunk(&g, 0, 0, &members, 4).group;
    assert!(matches!(
        mean.take(second, &mut KeepMean),
        Err(ChunkError::Group { expected, .. }) if expected.is_empty()
    ));
    let mut single = group_chunk(&g, 0, 1, &[(1, 2)], 2);
    single.samples = 0;
    assert_eq!(
        mean.take(single, &mut KeepMean),
        Err(ChunkError::Group {
            expected: vec![(1, 2)],
            found: vec![(1, 2)]
        })
    );
    // The final chunk carries the group's samples and no statistics of its own.
    let mut last = group_chunk(&g, 1, 0, &members, 4);
    last.bn_stats = bn(0);
    assert_eq!(
        mean.take(last, &mut KeepMean),
        Err(ChunkError::FinalChunk {
            samples: 4,
            expected_samples: 4,
            bn: BN,
            expected_bn: 0
        })
    );
    assert_eq!(
        mean.take(group_chunk(&g, 1, 0, &members, 4), &mut KeepMean),
        Ok(Taken::Ok)
    );
}

#[test]
fn a_group_names_the_shard_whose_gradient_or_statistics_are_not_finite() {
    let len = 100;
    let g = values(4, len);
    let members = [(3u32, 2u32), (5, 2)];
    let mut mean = StreamingMean::new(len, BN, GradientCompression::None);
    mean.begin_parts(&[members.to_vec()]);
    let mut flagged = group_chunk(&g, 0, 3, &members, 4);
    flagged.group[1].non_finite = true;
    assert_eq!(mean.take(flagged, &mut KeepMean), Ok(Taken::NonFinite { shard: 5 }));

    mean.begin_parts(&[members.to_vec()]);
    let mut statistics = group_chunk(&g, 0, 3, &members, 4);
    statistics.group[0].bn_stats[1] = f32::INFINITY;
    assert_eq!(mean.take(statistics, &mut KeepMean), Ok(Taken::NonFinite { shard: 3 }));
}
