//! The fake worker process of the exchange benchmark: it joins a real coordinator, answers
//! every Evaluate with equal finite losses (so the balancing trains both networks), uploads a
//! constant gradient for each network and receives the broadcast, until Shutdown. It records
//! when each phase's upload was queued, when the first parameter chunk came back and when the
//! last did, and writes them as JSON to a report file.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use forger_common::compression::GradientCompression;
use forger_common::layout;
use forger_common::wire;
use forger_proto::pb::{self, coordinator_message::Kind as In, worker_message::Kind as Out};
use forger_proto::tls::ClientSecurity;
use serde_json::json;

use crate::fake_worker::FakeWorker;

/// Every gradient value: small, so the parameters stay finite however long it runs.
pub const GRADIENT: f32 = 1e-4;
/// Each loss, as a mean over the batch: equal for D and G, so both always train.
const LOSS: f64 = 0.7;

/// Timings of one network's phase, in seconds.
#[derive(Debug, Clone, Copy, Default)]
struct PhaseTimes {
    /// Encoding the gradient into chunks and queueing them on the data connection.
    upload: f64,
    /// From the last chunk queued to the first parameter chunk back: the rest of the upload
    /// on the wire, waiting for the other workers, the coordinator's update and its encoding.
    wait: f64,
    /// From the first parameter chunk to the last one decoded.
    download: f64,
}

/// Runs one fake worker against `url` and writes its timings to `report`.
pub fn main(url: &str, report: &Path, credentials: Option<&Path>) -> anyhow::Result<()> {
    let security = match credentials {
        Some(dir) => ClientSecurity::load(dir, None)?,
        None => ClientSecurity::Insecure,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let value = runtime.block_on(run(url, &security))?;
    std::fs::write(report, serde_json::to_vec(&value)?).with_context(|| format!("cannot write {}", report.display()))
}

async fn run(url: &str, security: &ClientSecurity) -> anyhow::Result<serde_json::Value> {
    let mut worker = FakeWorker::join_secured(url, security, 1).await;
    let shards = worker.take_assignment().await;
    eprintln!(
        "fake worker {} (slot {}) holds shards {shards:?}",
        worker.id, worker.rank
    );
    let mut d = vec![0f32; worker.d_len()];
    let mut g = vec![0f32; worker.g_len()];
    receive_params(&mut worker, pb::Network::Discriminator, &mut d).await?;
    receive_params(&mut worker, pb::Network::Generator, &mut g).await?;
    let d_gradient = Gradient::new(&worker, vec![GRADIENT; d.len()]);
    let g_gradient = Gradient::new(&worker, vec![GRADIENT; g.len()]);
    // Means 0 and variances 1: finite batch statistics.
    let bn_stats = layout::initial_batch_norm_running(&worker.spec.model);
    assert_eq!(bn_stats.len(), worker.bn_len());
    let samples = worker.spec.train.batch_size;

    let mut steps = Vec::new();
    let mut evaluated_at = None;
    loop {
        match worker.recv().await {
            In::Evaluate(e) => {
                evaluated_at = Some((e.step, Instant::now()));
                if e.check_params {
                    bail!("the coordinator asked for a parameter check; the benchmark spec turns it off");
                }
                let shards = e
                    .batches
                    .iter()
                    .map(|b| {
                        let n = b.indices.len() as u32;
                        pb::ShardLosses {
                            shard: b.shard,
                            samples: n,
                            sum_d_real: LOSS * f64::from(n),
                            sum_d_fake: LOSS * f64::from(n),
                            sum_g: LOSS * f64::from(n),
                        }
                    })
                    .collect();
                worker
                    .send(Out::Losses(pb::Losses {
                        step: e.step,
                        attempt: e.attempt,
                        shards,
                        params_crc32: None,
                    }))
                    .await;
            }
            In::Plan(p) => {
                let planned = Instant::now();
                let evaluate = match evaluated_at {
                    Some((step, at)) if step == p.step => planned.duration_since(at).as_secs_f64(),
                    _ => bail!("a plan for step {} without its Evaluate", p.step),
                };
                let at = (p.step, p.attempt);
                let mut phase_d = None;
                let mut phase_g = None;
                if p.train_d {
                    let times = exchange(
                        &mut worker,
                        at,
                        pb::Phase::Discriminator,
                        (&d_gradient, samples, &bn_stats),
                        &mut d,
                    )
                    .await?;
                    phase_d = Some(times);
                }
                if p.train_g {
                    let times = exchange(
                        &mut worker,
                        at,
                        pb::Phase::Generator,
                        (&g_gradient, samples, &bn_stats),
                        &mut g,
                    )
                    .await?;
                    phase_g = Some(times);
                }
                let phase_json = |t: Option<PhaseTimes>| {
                    t.map(|t| json!({ "upload_s": t.upload, "wait_s": t.wait, "download_s": t.download }))
                };
                steps.push(json!({
                    "step": p.step,
                    "attempt": p.attempt,
                    "evaluate_s": evaluate,
                    "discriminator": phase_json(phase_d),
                    "generator": phase_json(phase_g),
                    "from_evaluate_s": evaluated_at.map(|(_, t)| t.elapsed().as_secs_f64()),
                }));
            }
            In::Sample(request) => {
                let size = worker.spec.data.image_size;
                let pixels = vec![128u8; (request.count * size * size * 3) as usize];
                worker
                    .send(Out::Samples(pb::Samples {
                        step: request.step,
                        count: request.count,
                        image_size: size,
                        pixels: pixels.into(),
                    }))
                    .await;
            }
            In::Shutdown(s) => {
                if s.rejoin {
                    bail!("evicted by the coordinator: {}", s.reason);
                }
                eprintln!("fake worker {}: shut down ({})", worker.id, s.reason);
                break;
            }
            other => bail!("unexpected message from the coordinator: {}", describe(&other)),
        }
    }
    Ok(json!({ "worker": worker.id, "shards": shards, "steps": steps }))
}

/// Uploads `gradient` for every shard held, then receives the network's new parameters.
async fn exchange(
    worker: &mut FakeWorker,
    at: (u64, u32),
    phase: pb::Phase,
    (gradient, samples, bn_stats): (&Gradient, u32, &[f32]),
    params: &mut [f32],
) -> anyhow::Result<PhaseTimes> {
    let network = match phase {
        pb::Phase::Discriminator => pb::Network::Discriminator,
        _ => pb::Network::Generator,
    };
    let started = Instant::now();
    let held: Vec<u32> = worker.shards.keys().copied().collect();
    for shard in held {
        match gradient {
            Gradient::Encoded(bytes) => {
                worker
                    .upload_encoded(at, phase, shard, bytes.clone(), samples, bn_stats.to_vec())
                    .await
            }
            Gradient::Values(values) => {
                worker
                    .upload(at, phase, shard, values, samples, bn_stats.to_vec())
                    .await
            }
        }
    }
    let uploaded = Instant::now();
    let first = receive_params(worker, network, params).await?;
    let done = Instant::now();
    Ok(PhaseTimes {
        upload: uploaded.duration_since(started).as_secs_f64(),
        wait: first.duration_since(uploaded).as_secs_f64(),
        download: done.duration_since(first).as_secs_f64(),
    })
}

/// A network's constant gradient as the fake worker sends it each step.
enum Gradient {
    /// f32: a real worker hands its gradient to the connection without a copy, so this one
    /// is encoded once and the same bytes are sent every step.
    Encoded(bytes::Bytes),
    /// bf16: rounded with error feedback every step, as a real worker does.
    Values(Vec<f32>),
}

impl Gradient {
    fn new(worker: &FakeWorker, values: Vec<f32>) -> Gradient {
        match worker.spec.cluster.gradient_compression {
            GradientCompression::None => Gradient::Encoded(wire::f32_bytes_owned(values)),
            GradientCompression::Bf16 => Gradient::Values(values),
        }
    }
}

/// Receives one network's parameters into `params`, decoding each chunk in place; returns
/// when the first chunk arrived.
async fn receive_params(worker: &mut FakeWorker, network: pb::Network, params: &mut [f32]) -> anyhow::Result<Instant> {
    let mut first = None;
    let mut filled = 0;
    loop {
        let chunk = match worker.recv().await {
            In::Params(chunk) => chunk,
            other => bail!("expected {network:?} parameters, got {}", describe(&other)),
        };
        first.get_or_insert_with(Instant::now);
        if chunk.network() != network || chunk.offset as usize != filled {
            bail!(
                "parameter chunk out of order: {:?} at offset {} (expected {network:?} at {filled})",
                chunk.network(),
                chunk.offset
            );
        }
        let end = filled + chunk.values.len() / 4;
        if end > params.len() || !wire::le_bytes_to_f32(&chunk.values, &mut params[filled..end]) {
            bail!("a {network:?} parameter chunk does not fit the layout");
        }
        filled = end;
        if chunk.last {
            if filled != params.len() {
                bail!("{network:?} parameters ended at {filled} of {} values", params.len());
            }
            return Ok(first.expect("set above"));
        }
    }
}

/// A message's kind, without its payload.
fn describe(kind: &In) -> String {
    match kind {
        In::Params(p) => format!("parameters ({:?}, step {})", p.network(), p.step),
        In::Evaluate(e) => format!("Evaluate for step {}", e.step),
        In::Plan(p) => format!("Plan for step {}", p.step),
        In::Assign(a) => format!("Assign {:?}", a.shards),
        In::Sample(s) => format!("SampleRequest for step {}", s.step),
        In::Shutdown(s) => format!("Shutdown ({})", s.reason),
    }
}
