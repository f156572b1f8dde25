//! Writes a small TensorBoard log with forger's event writer, for checking it in a real
//! TensorBoard (scripts/check_tensorboard.py reads it back):
//!
//! ```text
//! cargo run --release -p forger-coordinator --example tensorboard_log -- /tmp/forger-tb
//! ```
//!
//! 100 steps of made-up `loss_d` and `loss_g` (`loss_d` = 0.3 + 1.1 * 0.98^step), and a 40x40
//! RGB `samples` image every 25 steps, flushed every 25 steps as the trainer does at
//! checkpoints.

use std::io::Cursor;
use std::path::PathBuf;

use anyhow::Context;
use forger_coordinator::tensorboard::EventWriter;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).context("usage: tensorboard_log DIR")?);
    let mut writer = EventWriter::create(&dir)?;
    for step in 1..=100u64 {
        let decay = 0.98f64.powi(step as i32);
        writer.scalar("loss_d", step, 0.3 + 1.1 * decay)?;
        writer.scalar("loss_g", step, 3.0 - 2.0 * decay)?;
        if step % 25 == 0 {
            // A picture that changes with the step, so the viewer's slider has something to show.
            let shade = (step * 2) as u8;
            let picture = RgbImage::from_fn(40, 40, |x, y| Rgb([(x * 6) as u8, (y * 6) as u8, shade]));
            let mut png = Cursor::new(Vec::new());
            DynamicImage::from(picture).write_to(&mut png, ImageFormat::Png)?;
            writer.image_png("samples", step, png.get_ref(), 40, 40)?;
            writer.flush()?;
        }
    }
    println!("{}", writer.path().display());
    Ok(())
}
