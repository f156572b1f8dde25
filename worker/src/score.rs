//! `forger-worker score`: the quality score of checkpoints, as the coordinator computes it at
//! each checkpoint of a run: the same held-out images, the same generated noise, the same
//! patches and directions. It scores checkpoints of runs that had no score (or another
//! setting) and lets runs be compared after the fact.

use std::path::Path;

use forger_common::quality::{SwdScore, job};
use forger_common::sampler::split_for;
use forger_common::{checkpoint, dataset};
use serde::Serialize;
use tch::Device;

use crate::error::{Result, WorkerError};
use crate::replica::{Net, Replica, noise};

/// One checkpoint's score.
#[derive(Debug, Clone, Serialize)]
pub struct Scored {
    pub checkpoint: String,
    pub step: u64,
    pub swd: f64,
    pub swd_levels: Vec<f64>,
    pub held_out: usize,
    pub generated: u32,
}

/// Scores each checkpoint against the images its job holds out, read from `data` or the
/// checkpoint's own `data.path`. The dataset is loaded once for checkpoints of one job.
pub fn score(checkpoints: &[impl AsRef<Path>], data: Option<&Path>, device: Device) -> Result<Vec<Scored>> {
    let mut loaded: Option<(dataset::PreparedDataset, std::path::PathBuf, u32, usize)> = None;
    let mut scored = Vec::with_capacity(checkpoints.len());
    for path in checkpoints {
        let path = path.as_ref();
        let found = checkpoint::load(path)?;
        let mut spec = found.spec;
        if let Some(data) = data {
            spec.data.path = data.to_path_buf();
        }
        let key = (spec.data.path.clone(), spec.data.image_size, spec.data.limit);
        let same = loaded
            .as_ref()
            .is_some_and(|(_, p, size, limit)| (p, size, limit) == (&key.0, &key.1, &key.2));
        if !same {
            let images = dataset::load(&key.0, key.1, key.2)?;
            loaded = Some((images, key.0, key.1, key.2));
        }
        let images = &loaded.as_ref().expect("loaded above").0;
        let split = split_for(&spec, images.len());
        if split.held_out.is_empty() {
            return Err(WorkerError::Spec(format!(
                "{}: its job holds out no images to score against (quality.held_out = {}, {} images in {})",
                path.display(),
                spec.quality.held_out,
                images.len(),
                spec.data.path.display()
            )));
        }
        let held: Vec<u8> = split
            .held_out
            .iter()
            .flat_map(|&i| images.image(i as usize).iter().copied())
            .collect();
        let reference = job::reference(&spec, &held)?;
        let mut replica = Replica::new(&spec.model, spec.data.image_size as usize, device)?;
        replica.set_params(Net::Generator, &found.state.generator.params)?;
        replica.set_batch_norm_running(&found.state.batch_norm)?;
        let dim = spec.model.noise_dim as usize;
        let mut pixels = Vec::new();
        for request in job::requests(&spec) {
            let batch = noise(request.seed, request.count as usize, dim, device)?;
            pixels.extend(replica.sample(&batch)?);
        }
        let SwdScore { levels, mean } = reference.score(&pixels, spec.quality.generated as usize)?;
        scored.push(Scored {
            checkpoint: path.display().to_string(),
            step: found.state.step,
            swd: mean,
            swd_levels: levels,
            held_out: split.held_out.len(),
            generated: spec.quality.generated,
        });
    }
    Ok(scored)
}
