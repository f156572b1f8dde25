//! The quality score at each checkpoint: generated images from one fixed noise batch against
//! the images the run held out, by the sliced Wasserstein distance of their Laplacian-pyramid
//! patches (`forger_common::quality`).
//!
//! The held-out set's descriptors are computed once, when the run starts; each checkpoint then
//! costs the generator's forward pass on one worker and one score on the coordinator.

use forger_common::dataset::PreparedDataset;
use forger_common::quality::job::{self, ImageRequest};
use forger_common::quality::{SwdReference, SwdScore};
use forger_common::spec::JobSpec;

use crate::error::Result;

/// The held-out reference and the fixed noise batch the run is scored with.
#[derive(Debug)]
pub struct QualityProbe {
    reference: SwdReference,
    requests: Vec<ImageRequest>,
    generated: u32,
    held_out: usize,
}

impl QualityProbe {
    /// The probe for a run holding out `held_out` (dataset indices), or `None` when it holds
    /// none out (score off, or a dataset too small to spare them).
    pub fn new(spec: &JobSpec, dataset: &PreparedDataset, held_out: &[u32]) -> Result<Option<QualityProbe>> {
        if held_out.is_empty() {
            return Ok(None);
        }
        Ok(Some(QualityProbe {
            reference: job::reference(spec, &dataset.gather(held_out))?,
            requests: job::requests(spec),
            generated: spec.quality.generated,
            held_out: held_out.len(),
        }))
    }

    /// The sample requests that together draw the generated set, in order.
    pub fn requests(&self) -> &[ImageRequest] {
        &self.requests
    }

    /// Real images the run held out and scores against.
    pub fn held_out(&self) -> usize {
        self.held_out
    }

    /// Images generated per score.
    pub fn generated(&self) -> u32 {
        self.generated
    }

    /// The score of the generated set (the requests' images, concatenated in order).
    pub fn score(&self, pixels: &[u8]) -> Result<SwdScore> {
        Ok(self.reference.score(pixels, self.generated as usize)?)
    }
}
