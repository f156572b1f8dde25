//! Times the quality score on 512 vs 512 images of 40x40, and with a faces folder also shows
//! how much real-vs-real varies over seeds.
//!
//! `cargo run --release -p forger-common --example swd_timing -- [PATCHES DIRECTIONS [FACES]]`

use std::path::Path;
use std::time::Instant;

use forger_common::quality::{SwdReference, SwdSettings};
use forger_common::seeds;

const SIZE: u32 = 40;
const COUNT: usize = 512;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut settings = SwdSettings::default();
    if let [patches, directions, ..] = &args[..] {
        settings.patches_per_image = patches.parse()?;
        settings.directions = directions.parse()?;
    }
    let bytes = (SIZE * SIZE * 3) as usize * COUNT;
    let (real, generated) = match args.get(2) {
        Some(dir) => {
            let data = forger_common::dataset::load(Path::new(dir), SIZE, 2 * COUNT + 64)?;
            (data.pixels[..bytes].to_vec(), data.pixels[bytes..2 * bytes].to_vec())
        }
        // Timing barely depends on the content: uniform noise will do.
        None => {
            let noise = |seed| -> Vec<u8> {
                seeds::uniform_noise(seed, 1, bytes)
                    .iter()
                    .map(|v| (v * 256.0) as u8)
                    .collect()
            };
            (noise(1), noise(2))
        }
    };
    println!("{settings:?}");
    let (mut means, mut levels) = (Vec::new(), Vec::<Vec<f64>>::new());
    for seed in 1..=5 {
        let started = Instant::now();
        let reference = SwdReference::new(&real, COUNT, SIZE, &SwdSettings { seed, ..settings })?;
        let built = started.elapsed();
        let started = Instant::now();
        let score = reference.score(&generated, COUNT)?;
        let scored = started.elapsed();
        println!(
            "seed {seed}: reference {built:.2?}, score {scored:.2?}: {:.2} {:.2?}",
            score.mean, score.levels
        );
        means.push(score.mean);
        levels.push(score.levels);
    }
    let (average, std) = mean_std(&means);
    println!(
        "mean {average:.2}, std over seeds {std:.2} ({:.1}%)",
        100.0 * std / average
    );
    for l in 0..levels[0].len() {
        let (average, std) = mean_std(&levels.iter().map(|s| s[l]).collect::<Vec<_>>());
        println!(
            "  level {l}: mean {average:.2}, std {std:.2} ({:.1}%)",
            100.0 * std / average
        );
    }
    Ok(())
}

/// The mean and the sample standard deviation.
fn mean_std(values: &[f64]) -> (f64, f64) {
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() - 1).max(1) as f64;
    (mean, var.sqrt())
}
