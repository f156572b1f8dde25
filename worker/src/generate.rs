//! `forger-worker generate`: faces from a checkpoint, as one grid image.

use std::path::Path;

use forger_common::{checkpoint, grid};
use tch::Device;

use crate::error::Result;
use crate::replica::{Net, Replica, noise};

/// Draws `count` images from the checkpoint's generator with noise from `seed` and writes
/// them to `out` as a PNG grid.
pub fn generate(checkpoint_path: &Path, count: usize, seed: u64, device: Device, out: &Path) -> Result<()> {
    let checkpoint = checkpoint::load(checkpoint_path)?;
    let spec = &checkpoint.spec;
    let size = spec.data.image_size;
    let mut replica = Replica::new(&spec.model, size as usize, device)?;
    replica.set_params(Net::Generator, &checkpoint.state.generator.params)?;
    replica.set_batch_norm_running(&checkpoint.state.batch_norm)?;
    let noise = noise(seed, count, spec.model.noise_dim as usize, device)?;
    let pixels = replica.sample(&noise)?;
    grid::save_png(out, &grid::tile(&pixels, count, size))?;
    Ok(())
}
