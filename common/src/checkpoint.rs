//! The training state and its checkpoint file.
//!
//! A checkpoint is a safetensors file holding everything a resumed run needs: both networks'
//! parameters, their RMSProp mean squares, the generator's batch-norm running statistics, and
//! in the metadata the step, the resolved job spec, each shard's sampler position, and a CRC32
//! over every tensor so a torn or damaged file is noticed rather than trained on. Files are
//! named `step-NNNNNNNN.safetensors` after the number of completed steps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::atomic;
use crate::layout::{self, NetLayout};
use crate::sampler::SamplerState;
use crate::spec::JobSpec;
use crate::{Error, Result};

/// Written in the metadata; a file without it is not a forger checkpoint.
pub const FORMAT: &str = "forger-checkpoint-1";

/// One network's parameters and optimizer state, as flat buffers in layout order.
#[derive(Debug, Clone, PartialEq)]
pub struct NetState {
    pub params: Vec<f32>,
    pub mean_square: Vec<f32>,
}

/// All that the coordinator owns between steps.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingState {
    /// Steps completed.
    pub step: u64,
    pub discriminator: NetState,
    pub generator: NetState,
    /// Batch-norm running statistics: per layer, its means then its variances.
    pub batch_norm: Vec<f32>,
    /// Where each rank's shard sampler stands.
    pub samplers: Vec<SamplerState>,
    /// Images the shards were cut from: the dataset less the images held out for the score.
    pub dataset_len: usize,
}

/// A checkpoint as read back: the spec it was written under and the state.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub spec: JobSpec,
    pub state: TrainingState,
}

/// `step-00001234.safetensors`.
pub fn file_name(step: u64) -> String {
    format!("step-{step:08}.safetensors")
}

/// The step a checkpoint file name stands for.
pub fn step_of(file_name: &str) -> Option<u64> {
    file_name
        .strip_prefix("step-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// Checkpoint files in `dir`, oldest first. A missing folder has none.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::file("failed to list checkpoints in", dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::file("failed to list checkpoints in", dir, e))?;
        if let Some(step) = step_of(&entry.file_name().to_string_lossy()) {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Which of the `existing` checkpoint steps to delete so that the newest `keep` up to
/// `current` (the one just written) remain. Files named after later steps are not this run's
/// (a damaged leftover, say) and are left alone rather than allowed to push out good ones.
pub fn checkpoints_to_delete(existing: &[u64], current: u64, keep: usize) -> Vec<u64> {
    let mut steps: Vec<u64> = existing.iter().copied().filter(|&s| s <= current).collect();
    steps.sort_unstable();
    steps.dedup();
    let excess = steps.len().saturating_sub(keep);
    steps.truncate(excess);
    steps
}

struct Named<'a> {
    name: String,
    shape: Vec<usize>,
    values: &'a [f32],
}

fn tensors<'a>(spec: &JobSpec, state: &'a TrainingState) -> Vec<Named<'a>> {
    let image_size = spec.data.image_size as usize;
    let mut out = Vec::new();
    let mut push_net = |prefix: &str, layout: &NetLayout, values: &'a [f32]| {
        for (param, range) in layout.ranges() {
            out.push(Named {
                name: format!("{prefix}.{}", param.name),
                shape: param.shape.clone(),
                values: &values[range],
            });
        }
    };
    let d_layout = layout::discriminator_layout(&spec.model, image_size);
    let g_layout = layout::generator_layout(&spec.model);
    push_net("discriminator", &d_layout, &state.discriminator.params);
    push_net("generator", &g_layout, &state.generator.params);
    push_net("rmsprop.discriminator", &d_layout, &state.discriminator.mean_square);
    push_net("rmsprop.generator", &g_layout, &state.generator.mean_square);
    let mut offset = 0;
    for layer in layout::generator_batch_norms(&spec.model) {
        for stat in ["running_mean", "running_var"] {
            out.push(Named {
                name: format!("batch_norm.{}.{stat}", layer.name),
                shape: vec![layer.channels],
                values: &state.batch_norm[offset..offset + layer.channels],
            });
            offset += layer.channels;
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn crc_of<'a>(parts: impl Iterator<Item = &'a [u8]>) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize()
}

/// The state's tensors as safetensors views of their own memory, and the checkpoint's metadata.
fn views<'a>(spec: &JobSpec, named: &'a [Named<'a>]) -> (Vec<(String, TensorView<'a>)>, HashMap<String, String>) {
    // The tensors' own memory is their little-endian bytes (see `wire`): views, not copies.
    let bytes: Vec<&[u8]> = named.iter().map(|t| bytemuck::cast_slice(t.values)).collect();
    let crc = crc_of(bytes.iter().copied());
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), FORMAT.to_string());
    metadata.insert("crc32".to_string(), crc.to_string());
    metadata.insert("spec".to_string(), spec.to_toml());
    let views = named
        .iter()
        .zip(bytes)
        .map(|(t, b)| {
            let view = TensorView::new(Dtype::F32, t.shape.clone(), b).expect("shape matches byte length");
            (t.name.clone(), view)
        })
        .collect();
    (views, metadata)
}

fn state_metadata(state: &TrainingState, metadata: &mut HashMap<String, String>) {
    metadata.insert("step".to_string(), state.step.to_string());
    metadata.insert(
        "samplers".to_string(),
        serde_json::to_string(&state.samplers).expect("sampler states serialise"),
    );
    metadata.insert("dataset_len".to_string(), state.dataset_len.to_string());
}

/// Serialises the state to safetensors bytes in memory: the tests' way to damage a
/// checkpoint byte by byte ([`save`] streams to the file instead).
#[cfg(test)]
fn encode(spec: &JobSpec, state: &TrainingState) -> Vec<u8> {
    let named = tensors(spec, state);
    let (views, mut metadata) = views(spec, &named);
    state_metadata(state, &mut metadata);
    safetensors::serialize(views, Some(metadata)).expect("in-memory safetensors serialisation")
}

/// Writes a checkpoint atomically, streaming the tensors to the file rather than building
/// the file in memory first (a checkpoint of the article's model is 43 MB).
pub fn save(path: &Path, spec: &JobSpec, state: &TrainingState) -> Result<()> {
    let named = tensors(spec, state);
    let (views, mut metadata) = views(spec, &named);
    state_metadata(state, &mut metadata);
    atomic::write_atomic_via(
        path,
        |tmp| {
            safetensors::serialize_to_file(views, Some(metadata), tmp).map_err(|e| match e {
                safetensors::SafeTensorError::IoError(io) => atomic::create_error(tmp, io),
                other => Error::file("failed to write", tmp, std::io::Error::other(other.to_string())),
            })?;
            // safetensors creates its file owner-only; checkpoints are read by other users and
            // containers (and were rw-r--r-- before), so keep them readable.
            set_readable(tmp)
        },
        || crate::faults::crash_point("checkpoint-before-rename", state.step),
    )
}

#[cfg(unix)]
fn set_readable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::file("failed to set the permissions of", path, e))
}

#[cfg(not(unix))]
fn set_readable(_: &Path) -> Result<()> {
    Ok(())
}

/// Reads and verifies a checkpoint: format, checksum, and every tensor's shape against the
/// layout of the spec stored in it.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| Error::file("failed to read checkpoint", path, e))?;
    decode(&bytes, path)
}

/// Decodes checkpoint bytes; `path` names them in errors.
pub fn decode(bytes: &[u8], path: &Path) -> Result<Checkpoint> {
    let bad = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let meta = header
        .metadata()
        .clone()
        .ok_or_else(|| bad("no metadata: not written by forger".into()))?;
    let get = |key: &str| meta.get(key).ok_or_else(|| bad(format!("metadata lacks `{key}`")));
    if get("format")? != FORMAT {
        return Err(bad(format!("format `{}` is not `{FORMAT}`", get("format")?)));
    }
    let spec = JobSpec::parse(get("spec")?, &format!("stored in {}", path.display()))?;
    let step: u64 = get("step")?.parse().map_err(|_| bad("`step` is not a number".into()))?;
    let dataset_len: usize = get("dataset_len")?
        .parse()
        .map_err(|_| bad("`dataset_len` is not a number".into()))?;
    let samplers: Vec<SamplerState> =
        serde_json::from_str(get("samplers")?).map_err(|e| bad(format!("`samplers` is malformed: {e}")))?;
    let expected_crc: u32 = get("crc32")?
        .parse()
        .map_err(|_| bad("`crc32` is not a number".into()))?;
    let file = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("damaged tensor data ({e})")))?;

    // Build an empty state of the right sizes, then fill each tensor through the same listing
    // the writer used, so names, order and shapes are checked in one place.
    let image_size = spec.data.image_size as usize;
    let d_len = layout::discriminator_layout(&spec.model, image_size).numel();
    let g_len = layout::generator_layout(&spec.model).numel();
    let mut state = TrainingState {
        step,
        discriminator: NetState {
            params: vec![0.0; d_len],
            mean_square: vec![0.0; d_len],
        },
        generator: NetState {
            params: vec![0.0; g_len],
            mean_square: vec![0.0; g_len],
        },
        batch_norm: vec![0.0; layout::batch_norm_stats_len(&spec.model)],
        samplers,
        dataset_len,
    };
    let mut hasher = crc32fast::Hasher::new();
    let mut filled = Vec::new();
    for expected in tensors(&spec, &state) {
        let view = file
            .tensor(&expected.name)
            .map_err(|_| bad(format!("tensor `{}` is missing", expected.name)))?;
        if view.dtype() != Dtype::F32 || view.shape() != expected.shape.as_slice() {
            return Err(bad(format!(
                "tensor `{}` is {:?} {:?}, expected F32 {:?}",
                expected.name,
                view.dtype(),
                view.shape(),
                expected.shape
            )));
        }
        hasher.update(view.data());
        let mut values = vec![0f32; expected.values.len()];
        crate::wire::le_bytes_to_f32(view.data(), &mut values);
        filled.push((expected.name, values));
    }
    if hasher.finalize() != expected_crc {
        return Err(bad("checksum mismatch: the file is damaged".into()));
    }
    if file.len() != filled.len() {
        return Err(bad(format!("holds {} tensors, expected {}", file.len(), filled.len())));
    }
    let by_name: HashMap<String, Vec<f32>> = filled.into_iter().collect();
    fill(&spec, &mut state, &by_name);
    Ok(Checkpoint { spec, state })
}

fn fill(spec: &JobSpec, state: &mut TrainingState, by_name: &HashMap<String, Vec<f32>>) {
    let image_size = spec.data.image_size as usize;
    let copy_net = |prefix: &str, layout: &NetLayout, dst: &mut [f32]| {
        for (param, range) in layout.ranges() {
            dst[range].copy_from_slice(&by_name[&format!("{prefix}.{}", param.name)]);
        }
    };
    let d_layout = layout::discriminator_layout(&spec.model, image_size);
    let g_layout = layout::generator_layout(&spec.model);
    copy_net("discriminator", &d_layout, &mut state.discriminator.params);
    copy_net("generator", &g_layout, &mut state.generator.params);
    copy_net("rmsprop.discriminator", &d_layout, &mut state.discriminator.mean_square);
    copy_net("rmsprop.generator", &g_layout, &mut state.generator.mean_square);
    let mut offset = 0;
    for layer in layout::generator_batch_norms(&spec.model) {
        for stat in ["running_mean", "running_var"] {
            let values = &by_name[&format!("batch_norm.{}.{stat}", layer.name)];
            state.batch_norm[offset..offset + layer.channels].copy_from_slice(values);
            offset += layer.channels;
        }
    }
}

/// The newest checkpoint that loaded, and the problems of the newer files passed over.
#[derive(Debug)]
pub struct Newest {
    pub found: Option<(PathBuf, Checkpoint)>,
    pub skipped: Vec<Error>,
}

/// The newest checkpoint in `dir` that loads, with a warning for each newer one that did not.
pub fn load_newest(dir: &Path) -> Result<Newest> {
    let mut skipped = Vec::new();
    for (named_step, path) in list(dir)?.into_iter().rev() {
        // A file copied in under another step's name would be trusted by its name alone.
        let loaded = load(&path).and_then(|checkpoint| {
            if checkpoint.state.step == named_step {
                Ok(checkpoint)
            } else {
                Err(Error::Checkpoint {
                    path: path.clone(),
                    message: format!(
                        "is named for step {named_step} but holds step {} (copied from elsewhere?)",
                        checkpoint.state.step
                    ),
                })
            }
        });
        match loaded {
            Ok(checkpoint) => {
                return Ok(Newest {
                    found: Some((path, checkpoint)),
                    skipped,
                });
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping unreadable checkpoint");
                skipped.push(e);
            }
        }
    }
    Ok(Newest { found: None, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::initial_parameters;
    use crate::rmsprop::initial_mean_square;

    fn small_spec() -> JobSpec {
        JobSpec::parse(
            "version = 1\n[data]\npath = \"x\"\n[model]\nd_filters = [4, 3, 2]\ng_filters = [5, 4, 3]\n",
            "test",
        )
        .unwrap()
    }

    fn state(spec: &JobSpec) -> TrainingState {
        let d = layout::discriminator_layout(&spec.model, 40);
        let g = layout::generator_layout(&spec.model);
        TrainingState {
            step: 42,
            discriminator: NetState {
                params: initial_parameters(&d, 1),
                mean_square: initial_mean_square(d.numel()),
            },
            generator: NetState {
                params: initial_parameters(&g, 2),
                mean_square: (0..g.numel()).map(|i| i as f32).collect(),
            },
            batch_norm: (0..layout::batch_norm_stats_len(&spec.model))
                .map(|i| i as f32 * 0.5)
                .collect(),
            samplers: vec![
                SamplerState { epoch: 3, cursor: 7 },
                SamplerState { epoch: 2, cursor: 1 },
            ],
            dataset_len: 100,
        }
    }

    #[test]
    fn round_trips_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let spec = small_spec();
        let state = state(&spec);
        let path = dir.path().join(file_name(42));
        save(&path, &spec, &state).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.state, state);
        assert_eq!(back.spec, spec);
    }

    #[test]
    fn the_streamed_file_holds_the_in_memory_encoding_and_is_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let spec = small_spec();
        let state = state(&spec);
        let path = dir.path().join(file_name(7));
        save(&path, &spec, &state).unwrap();
        // The same tensors and metadata as the in-memory encoding (whose header order varies:
        // safetensors writes the metadata map in hash order).
        let streamed = load(&path).unwrap();
        let in_memory = decode(&encode(&spec, &state), &path).unwrap();
        assert_eq!((streamed.state, streamed.spec), (in_memory.state, in_memory.spec));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
        let missing = dir.path().join("no-such-folder").join(file_name(7));
        let error = save(&missing, &spec, &state).unwrap_err().to_string();
        assert!(error.contains("no such folder to write into"), "{error}");
    }

    #[test]
    fn a_flipped_byte_is_detected() {
        let spec = small_spec();
        let mut bytes = encode(&spec, &state(&spec));
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        let err = decode(&bytes, Path::new("x.safetensors")).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn a_truncated_file_is_detected() {
        let spec = small_spec();
        let bytes = encode(&spec, &state(&spec));
        let err = decode(&bytes[..bytes.len() / 2], Path::new("x.safetensors")).unwrap_err();
        assert!(err.to_string().contains("x.safetensors"), "{err}");
    }

    #[test]
    fn newest_loadable_checkpoint_wins_over_a_damaged_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let spec = small_spec();
        let mut st = state(&spec);
        // A checkpoint holds the step its name says (load_newest refuses one that does not).
        st.step = 10;
        save(&dir.path().join(file_name(10)), &spec, &st).unwrap();
        std::fs::write(dir.path().join(file_name(20)), b"torn").unwrap();
        let Newest { found, skipped } = load_newest(dir.path()).unwrap();
        let (path, checkpoint) = found.unwrap();
        assert!(path.ends_with(file_name(10)));
        assert_eq!(checkpoint.state.step, 10);
        assert_eq!(skipped.len(), 1);
    }

    #[test]
    fn names_parse_and_old_checkpoints_are_pruned() {
        assert_eq!(step_of(&file_name(1234)), Some(1234));
        assert_eq!(step_of("step-12.tmp"), None);
        assert_eq!(checkpoints_to_delete(&[30, 10, 20, 40], 40, 2), vec![10, 20]);
        assert_eq!(checkpoints_to_delete(&[10], 10, 3), Vec::<u64>::new());
        // A leftover named after a later step never pushes out the one just written.
        assert_eq!(checkpoints_to_delete(&[40, 50, 99_999_999], 50, 1), vec![40]);
    }
}
