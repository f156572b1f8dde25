//! `forger-worker score`: the quality score of checkpoints, as the coordinator computes it at
//! each checkpoint of a run: the same held-out images, the same generated noise, the same
//! patches and directions. It scores checkpoints of runs that had no score (or another
//! setting) and lets runs be compared after the fact.

use std::path::{Path, PathBuf};

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

/// Scores checkpoints one at a time, loading a dataset once for the checkpoints of one job.
#[derive(Debug)]
pub struct Scorer {
    data: Option<PathBuf>,
    device: Device,
    /// The last dataset loaded, with the (folder, size, limit) it was loaded for.
    loaded: Option<((PathBuf, u32, usize), dataset::PreparedDataset)>,
}

impl Scorer {
    /// `data` overrides each checkpoint's own `data.path`.
    pub fn new(data: Option<&Path>, device: Device) -> Scorer {
        Scorer {
            data: data.map(Path::to_path_buf),
            device,
            loaded: None,
        }
    }

    /// A checkpoint's score against the images its job holds out.
    pub fn score(&mut self, path: &Path) -> Result<Scored> {
        let found = checkpoint::load(path)?;
        let mut spec = found.spec;
        if let Some(data) = &self.data {
            spec.data.path = data.clone();
        }
        let key = (spec.data.path.clone(), spec.data.image_size, spec.data.limit);
        if self.loaded.as_ref().is_none_or(|(loaded, _)| *loaded != key) {
            let images = dataset::load(&key.0, key.1, key.2)?;
            self.loaded = Some((key, images));
        }
        let images = &self.loaded.as_ref().expect("loaded above").1;
        let split = split_for(&spec, images.len());
        if split.held_out.is_empty() {
            return Err(WorkerError::Usage(format!(
                "{}: its job holds out no images to score against (quality.held_out = {}, and {} images in {} \
                 hold out none below {} times as many)",
                path.display(),
                spec.quality.held_out,
                images.len(),
                spec.data.path.display(),
                forger_common::spec::MIN_IMAGES_PER_HELD_OUT
            )));
        }
        let reference = job::reference(&spec, &images.gather(&split.held_out))?;
        let mut replica = Replica::new(&spec.model, spec.data.image_size as usize, self.device)?;
        replica.set_params(Net::Generator, &found.state.generator.params)?;
        replica.set_batch_norm_running(&found.state.batch_norm)?;
        let dim = spec.model.noise_dim as usize;
        let mut pixels = Vec::new();
        for request in job::requests(&spec) {
            let batch = noise(request.seed, request.count as usize, dim, self.device)?;
            pixels.extend(replica.sample(&batch)?);
        }
        let SwdScore { levels, mean } = reference.score(&pixels, spec.quality.generated as usize)?;
        Ok(Scored {
            checkpoint: path.display().to_string(),
            step: found.state.step,
            swd: mean,
            swd_levels: levels,
            held_out: split.held_out.len(),
            generated: spec.quality.generated,
        })
    }
}
