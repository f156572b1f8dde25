//! The job spec: one TOML file with a `version`, every table closed to unknown keys.
//!
//! Defaults are the article's values (see `examples/faces.toml`); `validate` reports every
//! out-of-range value with its dotted field name instead of stopping at the first.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::compression::GradientCompression;
use crate::{Error, Result};

mod structure;

/// The only spec version this build reads.
pub const SPEC_VERSION: u32 = 1;
/// The largest image side: the model is made for small images, and one image must fit a
/// protocol message with room to spare.
pub const MAX_IMAGE_SIZE: u32 = 512;
/// Bytes a sample batch may take on the wire (one message; gRPC's limit is 4 MiB).
const MAX_SAMPLE_BYTES: u64 = 3 << 20;
/// The widest layer (feature maps, noise values) a spec may ask for.
pub const MAX_WIDTH: u32 = 65_536;
/// Parameters of both networks together: 1 GB per copy as f32, of which the coordinator holds
/// about four (the article's model has 5.4 million).
pub const MAX_PARAMETERS: usize = 250_000_000;

/// Whether the image size leaves the layout computable (it is checked with its own message).
fn problems_so_far_ok(image_size: u32) -> bool {
    (8..=MAX_IMAGE_SIZE).contains(&image_size) && image_size.is_multiple_of(4)
}

/// A week: longer timeouts are surely mistakes (and would overflow deadline arithmetic).
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub version: u32,
    pub data: DataSpec,
    #[serde(default)]
    pub model: ModelSpec,
    #[serde(default)]
    pub train: TrainSpec,
    #[serde(default)]
    pub cluster: ClusterSpec,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    #[serde(default)]
    pub quality: QualitySpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Folder of images. A relative path is taken from the spec file's folder.
    pub path: PathBuf,
    /// Side of the square training images, in pixels.
    #[serde(default = "default_image_size")]
    pub image_size: u32,
    /// Use only the first `limit` images (sorted by file name); 0 means all.
    #[serde(default)]
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Length of the uniform [0, 1) noise vector.
    #[serde(default = "default_noise_dim")]
    pub noise_dim: u32,
    /// Feature maps of the discriminator's three convolutions.
    #[serde(default = "default_filters")]
    pub d_filters: Vec<u32>,
    /// Feature maps of the generator's first three transposed convolutions.
    #[serde(default = "default_filters")]
    pub g_filters: Vec<u32>,
    /// Fraction of activations dropped in training (never when sampling). 0 by default: the
    /// article's code never applied its 0.6, and the quality score prefers none by far
    /// (docs/QUALITY.md).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Total steps of the run; raise it and `--resume` to train longer.
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Images per worker per step.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default = "default_lr_d")]
    pub lr_d: f64,
    #[serde(default = "default_lr_g")]
    pub lr_g: f64,
    /// L2 weight decay on every trainable variable: the gradient gains `l2 * w`.
    #[serde(default = "default_l2")]
    pub l2: f64,
    /// A network whose loss times `balance` is below the other's sits the step out.
    #[serde(default = "default_balance")]
    pub balance: f64,
    #[serde(default)]
    pub seed: u64,
    /// RMSProp's decay of the mean square.
    #[serde(default = "default_rmsprop_decay")]
    pub rmsprop_decay: f64,
    /// RMSProp's epsilon, added inside the square root as TF1 does.
    #[serde(default = "default_rmsprop_epsilon")]
    pub rmsprop_epsilon: f64,
    /// Every this many steps each worker reports a checksum of its parameters; 0 turns it off.
    #[serde(default = "default_check_params_every")]
    pub check_params_every: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Data shards, each contributing one batch per step; also the most replicas that train at
    /// once (a worker process runs one, or one per device with `--devices`, and each takes a
    /// place). With fewer replicas, some compute several shards, so the math of a step never
    /// depends on how many workers computed it (up to rounding where a worker sums several
    /// replicas' shards itself).
    #[serde(default = "default_workers")]
    pub workers: u32,
    /// Below this many replicas (summed over the connected workers) the run pauses until more
    /// join.
    #[serde(default = "default_min_workers")]
    pub min_workers: u32,
    /// At the start, how long the coordinator waits for `min_workers` to join, in seconds.
    #[serde(default = "default_join_timeout_secs")]
    pub join_timeout_secs: u64,
    /// Once `min_workers` are there at the start, how long to wait for the rest before
    /// training begins without them (they join at a later step).
    #[serde(default = "default_start_grace_secs")]
    pub start_grace_secs: u64,
    /// How long one phase may take per shard a replica computes before its worker is evicted.
    #[serde(default = "default_step_timeout_secs")]
    pub step_timeout_secs: u64,
    /// A phase lasting more than this many times the slowest phase of the run so far (per
    /// shard, and at least 10 s) means a stuck worker, evicted well before the step timeout.
    /// 0 leaves only `step_timeout_secs`.
    #[serde(default = "default_stall_factor")]
    pub stall_factor: f64,
    /// How often every worker tells the coordinator it is alive, in seconds.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// A worker silent for this long is evicted, whatever the step is doing.
    #[serde(default = "default_heartbeat_timeout_secs")]
    pub heartbeat_timeout_secs: u64,
    /// How workers send gradients: "none" (f32, exact) or "bf16" (half the bytes, with error
    /// feedback so the rounding does not accumulate; see `compression`).
    #[serde(default)]
    pub gradient_compression: GradientCompression,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Write a checkpoint and a sample grid every this many steps (and after the last).
    #[serde(default = "default_checkpoint_every")]
    pub every: u64,
    /// Checkpoints to keep; older ones are deleted.
    #[serde(default = "default_checkpoint_keep")]
    pub keep: usize,
    /// Images in each sample grid, all from one fixed noise batch.
    #[serde(default = "default_samples")]
    pub samples: u32,
}

/// The quality score computed at every checkpoint: the sliced Wasserstein distance between
/// Laplacian-pyramid patches of held-out real images and of generated ones (lower is better).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualitySpec {
    /// Real images set aside before sharding, never trained on, that generated images are
    /// scored against; 0 turns the score off. Datasets of fewer than `MIN_IMAGES_PER_HELD_OUT`
    /// times this many images keep every image for training and are not scored.
    #[serde(default = "default_held_out")]
    pub held_out: u32,
    /// Generated images scored at each checkpoint, from one fixed noise batch.
    #[serde(default = "default_generated")]
    pub generated: u32,
}

/// A dataset must hold this many times `quality.held_out` images for any to be held out: a
/// score is not worth training on a large part fewer images.
pub const MIN_IMAGES_PER_HELD_OUT: usize = 10;
/// The fewest images on either side of a score: below this the distance is mostly noise.
pub const MIN_SCORED_IMAGES: u32 = 64;
/// The most images on either side of a score: enough for a stable distance, little enough to
/// score in seconds.
pub const MAX_SCORED_IMAGES: u32 = 8192;
/// Bytes the generated set may take: the coordinator holds it whole while scoring.
const MAX_SCORED_BYTES: u64 = 256 << 20;

fn default_held_out() -> u32 {
    512
}
fn default_generated() -> u32 {
    512
}

impl Default for QualitySpec {
    fn default() -> Self {
        QualitySpec {
            held_out: default_held_out(),
            generated: default_generated(),
        }
    }
}

impl QualitySpec {
    /// How many images a dataset of `images` holds out: `held_out`, or none when the dataset
    /// is too small to spare them.
    pub fn held_out_of(&self, images: usize) -> usize {
        let wanted = self.held_out as usize;
        if wanted > 0 && images >= wanted * MIN_IMAGES_PER_HELD_OUT {
            wanted
        } else {
            0
        }
    }
}

fn default_image_size() -> u32 {
    40
}
fn default_noise_dim() -> u32 {
    16
}
fn default_filters() -> Vec<u32> {
    vec![256, 128, 64]
}
fn default_dropout() -> f64 {
    0.0
}
fn default_steps() -> u64 {
    60_000
}
fn default_batch_size() -> u32 {
    16
}
fn default_lr_d() -> f64 {
    1e-4
}
fn default_lr_g() -> f64 {
    2e-4
}
fn default_l2() -> f64 {
    1e-6
}
fn default_balance() -> f64 {
    1.35
}
fn default_rmsprop_decay() -> f64 {
    0.9
}
fn default_rmsprop_epsilon() -> f64 {
    1e-10
}
fn default_check_params_every() -> u64 {
    10
}
fn default_workers() -> u32 {
    2
}
fn default_min_workers() -> u32 {
    1
}
fn default_join_timeout_secs() -> u64 {
    600
}
fn default_start_grace_secs() -> u64 {
    10
}
fn default_step_timeout_secs() -> u64 {
    60
}
fn default_stall_factor() -> f64 {
    10.0
}
fn default_heartbeat_secs() -> u64 {
    1
}
fn default_heartbeat_timeout_secs() -> u64 {
    5
}
fn default_checkpoint_every() -> u64 {
    500
}
fn default_checkpoint_keep() -> usize {
    5
}
fn default_samples() -> u32 {
    64
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec {
            noise_dim: default_noise_dim(),
            d_filters: default_filters(),
            g_filters: default_filters(),
            dropout: default_dropout(),
        }
    }
}

impl Default for TrainSpec {
    fn default() -> Self {
        TrainSpec {
            steps: default_steps(),
            batch_size: default_batch_size(),
            lr_d: default_lr_d(),
            lr_g: default_lr_g(),
            l2: default_l2(),
            balance: default_balance(),
            seed: 0,
            rmsprop_decay: default_rmsprop_decay(),
            rmsprop_epsilon: default_rmsprop_epsilon(),
            check_params_every: default_check_params_every(),
        }
    }
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            workers: default_workers(),
            min_workers: default_min_workers(),
            join_timeout_secs: default_join_timeout_secs(),
            start_grace_secs: default_start_grace_secs(),
            step_timeout_secs: default_step_timeout_secs(),
            stall_factor: default_stall_factor(),
            heartbeat_secs: default_heartbeat_secs(),
            heartbeat_timeout_secs: default_heartbeat_timeout_secs(),
            gradient_compression: GradientCompression::None,
        }
    }
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec {
            every: default_checkpoint_every(),
            keep: default_checkpoint_keep(),
            samples: default_samples(),
        }
    }
}

/// One out-of-range value, named by its dotted field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecProblem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl JobSpec {
    /// Reads and validates a spec file; a relative `data.path` is resolved against the file's
    /// folder so the spec works from any working directory.
    pub fn load(path: &Path) -> Result<JobSpec> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file("failed to read job spec", path, e))?;
        let mut spec = JobSpec::parse(&text, &path.display().to_string())?;
        if spec.data.path.is_relative() {
            let base = path.parent().unwrap_or(Path::new("."));
            spec.data.path = base.join(&spec.data.path);
        }
        Ok(spec)
    }

    /// Parses and validates spec text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<JobSpec> {
        let spec: JobSpec = match toml::from_str(text) {
            Ok(spec) => spec,
            Err(first) => {
                // Every key whose type or name is wrong, not just the first one serde met.
                let problems = structure::problems(text);
                return Err(if problems.is_empty() {
                    Error::SpecSyntax {
                        origin: origin.to_string(),
                        message: first.to_string(),
                    }
                } else {
                    Error::SpecInvalid {
                        origin: origin.to_string(),
                        problems,
                    }
                });
            }
        };
        let problems = spec.validate();
        if problems.is_empty() {
            Ok(spec)
        } else {
            Err(Error::SpecInvalid {
                origin: origin.to_string(),
                problems,
            })
        }
    }

    /// The spec as TOML, as saved beside checkpoints and sent to workers.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a JobSpec always serialises")
    }

    /// The settings that differ from `earlier`, as `field: old -> new`, in field order.
    pub fn changes_since(&self, earlier: &JobSpec) -> Vec<String> {
        fn flatten(prefix: &str, value: &toml::Value, out: &mut Vec<(String, String)>) {
            match value {
                toml::Value::Table(table) => {
                    for (key, value) in table {
                        let name = if prefix.is_empty() {
                            key.clone()
                        } else {
                            format!("{prefix}.{key}")
                        };
                        flatten(&name, value, out);
                    }
                }
                other => out.push((prefix.to_string(), other.to_string())),
            }
        }
        let flat = |spec: &JobSpec| {
            let mut out = Vec::new();
            flatten(
                "",
                &toml::Value::try_from(spec).expect("a JobSpec always serialises"),
                &mut out,
            );
            out
        };
        let before: std::collections::BTreeMap<String, String> = flat(earlier).into_iter().collect();
        flat(self)
            .into_iter()
            .filter_map(|(field, now)| match before.get(&field) {
                Some(was) if *was == now => None,
                Some(was) => Some(format!("{field}: {was} -> {now}")),
                None => Some(format!("{field}: (unset) -> {now}")),
            })
            .collect()
    }

    /// Every problem with the values, each naming its field.
    pub fn validate(&self) -> Vec<SpecProblem> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, field: &'static str, message: String| {
            if !ok {
                problems.push(SpecProblem {
                    field: field.to_string(),
                    message,
                });
            }
        };
        check(
            self.version == SPEC_VERSION,
            "version",
            format!("expected {SPEC_VERSION}, found {}", self.version),
        );
        let size = self.data.image_size;
        check(
            (8..=MAX_IMAGE_SIZE).contains(&size) && size.is_multiple_of(4),
            "data.image_size",
            format!("expected a multiple of 4 from 8 to {MAX_IMAGE_SIZE}, found {size}"),
        );
        check(
            (1..=MAX_WIDTH).contains(&self.model.noise_dim),
            "model.noise_dim",
            format!("expected 1 to {MAX_WIDTH}, found {}", self.model.noise_dim),
        );
        let mut shapes_ok = (1..=MAX_WIDTH).contains(&self.model.noise_dim) && problems_so_far_ok(size);
        for (field, filters) in [
            ("model.d_filters", &self.model.d_filters),
            ("model.g_filters", &self.model.g_filters),
        ] {
            let ok = filters.len() == 3 && filters.iter().all(|&f| (1..=MAX_WIDTH).contains(&f));
            shapes_ok &= ok;
            check(
                ok,
                field,
                format!("expected three feature-map counts from 1 to {MAX_WIDTH}, found {filters:?}"),
            );
        }
        // Each count may be fine and their product not: the coordinator holds several copies of
        // every parameter, so a model that cannot fit is refused here, not by the allocator.
        if shapes_ok {
            let image_size = size as usize;
            let values = crate::layout::discriminator_layout(&self.model, image_size).numel()
                + crate::layout::generator_layout(&self.model).numel();
            check(
                values <= MAX_PARAMETERS,
                "model",
                format!(
                    "the networks would have {values} parameters, more than the {MAX_PARAMETERS} forger trains \
                     (lower model.d_filters, model.g_filters or model.noise_dim)"
                ),
            );
        }
        let dropout = self.model.dropout;
        check(
            (0.0..1.0).contains(&dropout),
            "model.dropout",
            format!("expected a fraction in [0, 1), found {dropout}"),
        );
        let train = &self.train;
        check(train.steps >= 1, "train.steps", "expected at least 1, found 0".into());
        check(
            train.batch_size >= 1,
            "train.batch_size",
            "expected at least 1, found 0".into(),
        );
        for (field, value) in [("train.lr_d", train.lr_d), ("train.lr_g", train.lr_g)] {
            check(
                value.is_finite() && value > 0.0,
                field,
                format!("expected a positive learning rate, found {value}"),
            );
        }
        check(
            train.l2.is_finite() && train.l2 >= 0.0,
            "train.l2",
            format!("expected zero or more, found {}", train.l2),
        );
        check(
            train.balance.is_finite() && train.balance >= 1.0,
            "train.balance",
            format!("expected a ratio of at least 1, found {}", train.balance),
        );
        check(
            train.rmsprop_decay > 0.0 && train.rmsprop_decay < 1.0,
            "train.rmsprop_decay",
            format!("expected a value in (0, 1), found {}", train.rmsprop_decay),
        );
        check(
            train.rmsprop_epsilon.is_finite() && train.rmsprop_epsilon > 0.0,
            "train.rmsprop_epsilon",
            format!("expected a positive value, found {}", train.rmsprop_epsilon),
        );
        check(
            self.cluster.workers >= 1,
            "cluster.workers",
            "expected at least 1, found 0".into(),
        );
        let cluster = &self.cluster;
        check(
            (1..=cluster.workers.max(1)).contains(&cluster.min_workers),
            "cluster.min_workers",
            format!(
                "expected 1 to cluster.workers = {}, found {}",
                cluster.workers, cluster.min_workers
            ),
        );
        check(
            cluster.start_grace_secs <= MAX_TIMEOUT_SECS,
            "cluster.start_grace_secs",
            format!(
                "expected 0 to {MAX_TIMEOUT_SECS} seconds, found {}",
                cluster.start_grace_secs
            ),
        );
        check(
            cluster.stall_factor.is_finite() && (cluster.stall_factor == 0.0 || cluster.stall_factor >= 2.0),
            "cluster.stall_factor",
            format!(
                "expected 0 (off) or a factor of at least 2, found {}",
                cluster.stall_factor
            ),
        );
        check(
            (1..=MAX_TIMEOUT_SECS).contains(&cluster.heartbeat_secs),
            "cluster.heartbeat_secs",
            format!(
                "expected 1 to {MAX_TIMEOUT_SECS} seconds, found {}",
                cluster.heartbeat_secs
            ),
        );
        check(
            cluster.heartbeat_timeout_secs > cluster.heartbeat_secs
                && cluster.heartbeat_timeout_secs <= MAX_TIMEOUT_SECS,
            "cluster.heartbeat_timeout_secs",
            format!(
                "expected more than cluster.heartbeat_secs = {} and at most {MAX_TIMEOUT_SECS} seconds, found {}",
                cluster.heartbeat_secs, cluster.heartbeat_timeout_secs
            ),
        );
        check(
            (1..=MAX_TIMEOUT_SECS).contains(&self.cluster.join_timeout_secs),
            "cluster.join_timeout_secs",
            format!(
                "expected 1 to {MAX_TIMEOUT_SECS} seconds, found {}",
                self.cluster.join_timeout_secs
            ),
        );
        check(
            (1..=MAX_TIMEOUT_SECS).contains(&self.cluster.step_timeout_secs),
            "cluster.step_timeout_secs",
            format!(
                "expected 1 to {MAX_TIMEOUT_SECS} seconds, found {}",
                self.cluster.step_timeout_secs
            ),
        );
        check(
            self.checkpoint.every >= 1,
            "checkpoint.every",
            "expected at least 1, found 0".into(),
        );
        check(
            self.checkpoint.keep >= 1,
            "checkpoint.keep",
            "expected at least 1, found 0".into(),
        );
        // The sample batch travels in one message, which must stay under gRPC's 4 MiB.
        // Judged at 40 px when the size itself is out of range, so one mistake gives one line.
        let sample_side = if (8..=MAX_IMAGE_SIZE).contains(&size) { size } else { 40 };
        let max_samples = (MAX_SAMPLE_BYTES / (3 * u64::from(sample_side).pow(2))).clamp(1, 1024) as u32;
        check(
            (1..=max_samples).contains(&self.checkpoint.samples),
            "checkpoint.samples",
            format!(
                "expected 1 to {max_samples} at image_size {size}, found {}",
                self.checkpoint.samples
            ),
        );
        let held_out = self.quality.held_out;
        check(
            held_out == 0 || (MIN_SCORED_IMAGES..=MAX_SCORED_IMAGES).contains(&held_out),
            "quality.held_out",
            format!("expected 0 (no score) or {MIN_SCORED_IMAGES} to {MAX_SCORED_IMAGES}, found {held_out}"),
        );
        // The generated set is drawn in sample-sized messages and held whole while scored.
        let max_generated =
            (MAX_SCORED_BYTES / (3 * u64::from(sample_side).pow(2))).min(u64::from(MAX_SCORED_IMAGES)) as u32;
        let generated = self.quality.generated;
        check(
            held_out == 0 || (MIN_SCORED_IMAGES..=max_generated.max(MIN_SCORED_IMAGES)).contains(&generated),
            "quality.generated",
            format!("expected {MIN_SCORED_IMAGES} to {max_generated} at image_size {size}, found {generated}"),
        );
        problems
    }

    /// How many generated images one sample message carries at this spec's image size.
    pub fn samples_per_message(&self) -> u32 {
        let side = u64::from(self.data.image_size.max(1));
        (MAX_SAMPLE_BYTES / (3 * side * side)).clamp(1, 1024) as u32
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_model_too_large_to_hold_is_refused_before_anything_is_allocated() {
        let spec = |model: &str| JobSpec::parse(&format!("version = 1\n[data]\npath = \"x\"\n[model]\n{model}"), "t");
        let err = spec("d_filters = [20000, 20000, 20000]\n").unwrap_err().to_string();
        assert!(err.contains("model: the networks would have"), "{err}");
        let err = spec("d_filters = [100000, 1, 1]\nnoise_dim = 100000000\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.d_filters") && err.contains("model.noise_dim"),
            "{err}"
        );
        assert!(spec("d_filters = [256, 128, 64]\ng_filters = [256, 128, 64]\n").is_ok());
    }

    use super::*;

    const MINIMAL: &str = "version = 1\n[data]\npath = \"faces\"\n";

    #[test]
    fn changes_since_names_each_changed_field_with_both_values() {
        let before = JobSpec::parse(MINIMAL, "test").unwrap();
        let mut after = before.clone();
        after.train.seed = 4;
        after.train.steps = 100;
        after.model.dropout = 0.6;
        assert_eq!(
            after.changes_since(&before),
            vec![
                "model.dropout: 0.0 -> 0.6",
                "train.seed: 0 -> 4",
                "train.steps: 60000 -> 100"
            ]
        );
        assert!(before.changes_since(&before).is_empty());
    }

    #[test]
    fn minimal_spec_takes_the_article_defaults() {
        let spec = JobSpec::parse(MINIMAL, "test").unwrap();
        assert_eq!(spec.model.d_filters, vec![256, 128, 64]);
        assert_eq!(spec.model.noise_dim, 16);
        assert_eq!(spec.train.batch_size, 16);
        assert_eq!(spec.train.lr_d, 1e-4);
        assert_eq!(spec.train.lr_g, 2e-4);
        assert_eq!(spec.train.balance, 1.35);
        assert_eq!(spec.data.image_size, 40);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = JobSpec::parse(&format!("{MINIMAL}[train]\nstepz = 3\n"), "test").unwrap_err();
        assert!(err.to_string().contains("stepz"), "{err}");
    }

    #[test]
    fn wrong_types_are_rejected_with_their_name() {
        let err = JobSpec::parse(&format!("{MINIMAL}[train]\nsteps = \"many\"\n"), "test").unwrap_err();
        assert!(err.to_string().contains("steps"), "{err}");
    }

    #[test]
    fn every_range_problem_is_reported() {
        let text = format!(
            "{MINIMAL}[model]\ndropout = 1.5\nd_filters = [1, 2]\n[train]\nsteps = 0\nlr_g = -1.0\n[checkpoint]\nevery = 0\n"
        );
        let Err(Error::SpecInvalid { problems, .. }) = JobSpec::parse(&text, "test") else {
            panic!("expected range problems");
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "model.d_filters",
                "model.dropout",
                "train.steps",
                "train.lr_g",
                "checkpoint.every"
            ]
        );
    }

    #[test]
    fn sizes_that_cannot_travel_are_refused() {
        let text =
            format!("{MINIMAL}[checkpoint]\nsamples = 1024\n[cluster]\nstep_timeout_secs = 9223372036854775807\n");
        let Err(Error::SpecInvalid { problems, .. }) = JobSpec::parse(&text, "test") else {
            panic!("expected range problems");
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, vec!["cluster.step_timeout_secs", "checkpoint.samples"]);
        assert!(problems[1].message.contains("1 to 655"), "{}", problems[1].message);
    }

    #[test]
    fn the_quality_score_holds_out_images_only_from_a_dataset_that_can_spare_them() {
        let spec = JobSpec::parse(MINIMAL, "test").unwrap();
        assert_eq!((spec.quality.held_out, spec.quality.generated), (512, 512));
        assert_eq!(spec.quality.held_out_of(9780), 512);
        assert_eq!(spec.quality.held_out_of(5120), 512);
        assert_eq!(spec.quality.held_out_of(5119), 0);
        let off = JobSpec::parse(&format!("{MINIMAL}[quality]\nheld_out = 0\n"), "test").unwrap();
        assert_eq!(off.quality.held_out_of(100_000), 0);
        let Err(Error::SpecInvalid { problems, .. }) = JobSpec::parse(
            &format!("{MINIMAL}[quality]\nheld_out = 10\ngenerated = 100000\n"),
            "test",
        ) else {
            panic!("a score of 10 images against 100,000 is refused");
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, vec!["quality.held_out", "quality.generated"]);
        assert!(problems[1].message.contains("64 to 8192"), "{}", problems[1].message);
    }

    #[test]
    fn gradient_compression_is_off_unless_asked_for_and_names_its_choices() {
        let spec = JobSpec::parse(MINIMAL, "test").unwrap();
        assert_eq!(spec.cluster.gradient_compression, GradientCompression::None);
        let text = format!("{MINIMAL}[cluster]\ngradient_compression = \"bf16\"\n");
        let spec = JobSpec::parse(&text, "test").unwrap();
        assert_eq!(spec.cluster.gradient_compression, GradientCompression::Bf16);
        assert_eq!(JobSpec::parse(&spec.to_toml(), "again").unwrap(), spec);
        for wrong in ["\"fp8\"", "\"BF16\"", "3", "{ bf16 = {} }"] {
            let text = format!("{MINIMAL}[cluster]\ngradient_compression = {wrong}\n");
            let err = JobSpec::parse(&text, "test").unwrap_err().to_string();
            assert!(err.contains("gradient_compression"), "{wrong}: {err}");
        }
        let text = format!("{MINIMAL}[cluster]\ngradient_compression = \"fp8\"\n");
        let err = JobSpec::parse(&text, "test").unwrap_err().to_string();
        assert!(err.contains(r#"expected "none" or "bf16", found "fp8""#), "{err}");
    }

    #[test]
    fn version_must_match() {
        let err = JobSpec::parse("version = 2\n[data]\npath = \"x\"\n", "test").unwrap_err();
        assert!(err.to_string().contains("version: expected 1, found 2"), "{err}");
    }

    #[test]
    fn toml_round_trips() {
        let spec = JobSpec::parse(MINIMAL, "test").unwrap();
        assert_eq!(JobSpec::parse(&spec.to_toml(), "again").unwrap(), spec);
    }
}
