//! The coordinator's CPU cost per update, in this process: `average::update_network` (what
//! the coordinator runs per trained network per step) on synthetic contributions of the
//! article's layouts, next to the machine's memory copy bandwidth.

use std::hint::black_box;
use std::time::Instant;

use forger_common::average::update_network;
use forger_common::checkpoint::NetState;
use forger_common::layout;
use forger_common::rmsprop::{RmsProp, initial_mean_square};
use forger_common::spec::{ModelSpec, TrainSpec};
use forger_common::wire;
use serde_json::json;

use super::{Lens, gb_per_s, median};

/// Bytes of the buffer the memory copy benchmark copies.
pub const COPY_BYTES: usize = 256 << 20;

/// Bytes one update of a `len`-value network must touch with `contributions` gradients, at
/// the least: read every gradient (N), read and write the parameters (2) and the RMSProp mean
/// square (2), and write the average once (1): (N + 5) * len * 4. The batch-norm statistics
/// (a few hundred values) are left out. The current code makes more passes than this (it
/// zeroes the average, then reads and writes it once per contribution, then reads it again in
/// RMSProp), so the GB/s it implies is a floor on the traffic it really causes.
pub fn bytes_touched(contributions: usize, len: usize) -> usize {
    (contributions + 5) * len * 4
}

/// Times `update_network` for both networks with `workers` contributions, median of
/// `repetitions` (after one warm-up call each).
pub fn update_cost(model: &ModelSpec, workers: usize, repetitions: usize) -> serde_json::Value {
    let lens = Lens::of(model);
    let train = TrainSpec::default();
    let mut networks = serde_json::Map::new();
    let mut total_s = 0.0;
    let mut total_bytes = 0;
    for (name, len, lr) in [("discriminator", lens.d, train.lr_d), ("generator", lens.g, train.lr_g)] {
        let optimizer = RmsProp::for_spec(&train, lr);
        // Distinct small values per worker, so nothing is a constant the compiler could see.
        let gradients: Vec<Vec<f32>> = (0..workers)
            .map(|w| (0..len).map(|i| 1e-4 * (1 + (i + w) % 7) as f32).collect())
            .collect();
        let bn_stats: Vec<Vec<f32>> = (0..workers)
            .map(|_| layout::initial_batch_norm_running(model))
            .collect();
        let samples = train.batch_size;
        let contributions: Vec<(&[f32], u32)> = gradients.iter().map(|g| (g.as_slice(), samples)).collect();
        let stats: Vec<(&[f32], u32)> = bn_stats.iter().map(|s| (s.as_slice(), samples)).collect();
        let mut master = NetState {
            params: (0..len).map(|i| 0.01 * ((i % 13) as f32 - 6.0)).collect(),
            mean_square: initial_mean_square(len),
        };
        let mut average = vec![0f32; len];
        let mut batch_norm = layout::initial_batch_norm_running(model);
        let mut times = Vec::with_capacity(repetitions);
        for rep in 0..=repetitions {
            let started = Instant::now();
            update_network(
                &contributions,
                &stats,
                &optimizer,
                &mut master,
                &mut average,
                &mut batch_norm,
            );
            black_box(&master);
            if rep > 0 {
                times.push(started.elapsed().as_secs_f64());
            }
        }
        assert!(master.params.iter().all(|v| v.is_finite()), "the update stays finite");
        let median_s = median(&times);
        let bytes = bytes_touched(workers, len);
        total_s += median_s;
        total_bytes += bytes;
        networks.insert(
            name.into(),
            json!({
                "values": len,
                "median_s": median_s,
                "min_s": times.iter().copied().fold(f64::INFINITY, f64::min),
                "bytes_touched": bytes,
                "gb_per_s": gb_per_s(bytes as f64, median_s),
            }),
        );
    }
    networks.insert(
        "both".into(),
        json!({
            "median_s": total_s,
            "bytes_touched": total_bytes,
            "gb_per_s": gb_per_s(total_bytes as f64, total_s),
        }),
    );
    serde_json::Value::Object(networks)
}

/// Median time of `copy_from_slice` over a [`COPY_BYTES`] buffer, and its bandwidth counting
/// the bytes read and the bytes written (as [`bytes_touched`] does).
pub fn copy_bandwidth(repetitions: usize) -> serde_json::Value {
    let source: Vec<u8> = (0..COPY_BYTES).map(|i| i as u8).collect();
    // Written once so its pages exist before the first timed copy.
    let mut destination = vec![1u8; COPY_BYTES];
    let mut times = Vec::with_capacity(repetitions);
    for rep in 0..=repetitions {
        let started = Instant::now();
        destination.copy_from_slice(black_box(&source));
        black_box(&mut destination);
        if rep > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    assert_eq!(destination[12345], source[12345]);
    let median_s = median(&times);
    json!({
        "buffer_bytes": COPY_BYTES,
        "repetitions": repetitions,
        "median_s": median_s,
        "gb_per_s_read_plus_write": gb_per_s(2.0 * COPY_BYTES as f64, median_s),
        "gb_per_s_copied": gb_per_s(COPY_BYTES as f64, median_s),
    })
}

/// Median times of `wire::f32_to_le_bytes` and `wire::le_bytes_to_f32` over `len` values: what
/// every upload and broadcast costs each side per value, besides the copy on the wire.
pub fn codec_cost(len: usize, repetitions: usize) -> serde_json::Value {
    let values: Vec<f32> = (0..len).map(|i| 1e-4 * (i % 7) as f32).collect();
    let mut bytes = Vec::with_capacity(len * 4);
    let mut decoded = vec![0f32; len];
    let (mut encode, mut decode) = (Vec::new(), Vec::new());
    for rep in 0..=repetitions {
        bytes.clear();
        let started = Instant::now();
        wire::f32_to_le_bytes(black_box(&values), &mut bytes);
        let encoded = started.elapsed().as_secs_f64();
        let started = Instant::now();
        assert!(wire::le_bytes_to_f32(black_box(&bytes), &mut decoded));
        black_box(&mut decoded);
        if rep > 0 {
            encode.push(encoded);
            decode.push(started.elapsed().as_secs_f64());
        }
    }
    assert_eq!(decoded, values);
    let (encode_s, decode_s) = (median(&encode), median(&decode));
    let size = (len * 4) as f64;
    json!({
        "values": len,
        "encode_median_s": encode_s,
        "decode_median_s": decode_s,
        // Bytes read plus bytes written, as for the update.
        "encode_gb_per_s": gb_per_s(2.0 * size, encode_s),
        "decode_gb_per_s": gb_per_s(2.0 * size, decode_s),
    })
}

/// The `reduce-cost` report.
pub fn run(model: &ModelSpec, workers: usize, repetitions: usize) -> serde_json::Value {
    eprintln!("reduce-cost: update_network with {workers} contributions, {repetitions} repetitions");
    let update = update_cost(model, workers, repetitions);
    eprintln!("reduce-cost: memory copy of {} MiB", COPY_BYTES >> 20);
    let copy = copy_bandwidth(repetitions.clamp(3, 10));
    let codec = codec_cost(Lens::of(model).d, repetitions);
    let fraction = update["both"]["gb_per_s"].as_f64().unwrap_or(f64::NAN)
        / copy["gb_per_s_read_plus_write"].as_f64().unwrap_or(f64::NAN);
    json!({
        "benchmark": "reduce-cost",
        "workers": workers,
        "d_filters": model.d_filters,
        "g_filters": model.g_filters,
        "repetitions": repetitions,
        "threads": 1,
        "bytes_model": "(N gradients read + params read/write + mean square read/write + average write) x 4 bytes per value",
        "update_network": update,
        "memory_copy": copy,
        "wire_codec_discriminator": codec,
        "fraction_of_copy_bandwidth": fraction,
    })
}
