use std::path::Path;
use std::time::Instant;

use super::*;
use crate::seeds;

/// `count` smooth, varied test images: a few random waves per channel plus a little noise.
fn waves(count: usize, size: u32, seed: u64) -> Vec<u8> {
    let mut rng = seeds::rng(seed);
    let mut u = move || seeds::unit_f32(&mut rng);
    let n = size as usize;
    let mut pixels = Vec::with_capacity(count * n * n * 3);
    for _ in 0..count {
        let waves: Vec<[f32; 4]> = (0..9)
            .map(|_| [u() * 0.6, u() * 0.6, u() * 6.3, 20.0 + u() * 30.0])
            .collect();
        for y in 0..n {
            for x in 0..n {
                for c in 0..3 {
                    let mut v = 110.0 + 20.0 * c as f32;
                    for [fx, fy, phase, amp] in &waves[c * 3..c * 3 + 3] {
                        v += amp * (fx * x as f32 + fy * y as f32 + phase).sin();
                    }
                    pixels.push((v + (u() - 0.5) * 10.0).clamp(0.0, 255.0) as u8);
                }
            }
        }
    }
    pixels
}

fn shift_red(pixels: &[u8], by: u8) -> Vec<u8> {
    pixels
        .chunks_exact(3)
        .flat_map(|p| [p[0].saturating_add(by), p[1], p[2]])
        .collect()
}

fn small_settings(seed: u64) -> SwdSettings {
    SwdSettings {
        patches_per_image: 32,
        directions: 40,
        seed,
    }
}

#[test]
fn identical_sets_score_zero_and_a_colour_shift_scores_higher() {
    let real = waves(64, 24, 1);
    let reference = SwdReference::new(&real, 64, 24, &small_settings(7)).unwrap();
    assert_eq!(reference.level_sides(), [24, 12]);
    let same = reference.score(&real, 64).unwrap();
    assert_eq!(same.levels.len(), 2);
    assert!(same.mean.abs() < 1e-6, "{same:?}");

    let other = reference.score(&waves(64, 24, 2), 64).unwrap();
    let shifted = reference.score(&shift_red(&real, 40), 64).unwrap();
    println!("same {same:?}\nother set {other:?}\nred +40 {shifted:?}");
    assert!(other.mean > 0.0);
    // A flat shift is low-pass: it shows in the residual, far above another sample's distance.
    assert!(shifted.levels[1] > 3.0 * other.levels[1], "{shifted:?} vs {other:?}");
    assert!(shifted.mean > other.mean);
}

#[test]
fn scores_are_deterministic_for_a_seed() {
    let (real, generated) = (waves(20, 20, 3), waves(20, 20, 4));
    let a = SwdReference::new(&real, 20, 20, &small_settings(11)).unwrap();
    let b = SwdReference::new(&real, 20, 20, &small_settings(11)).unwrap();
    let first = a.score(&generated, 20).unwrap();
    assert_eq!(first, a.score(&generated, 20).unwrap());
    assert_eq!(first, b.score(&generated, 20).unwrap());
    let c = SwdReference::new(&real, 20, 20, &small_settings(12)).unwrap();
    assert_ne!(first, c.score(&generated, 20).unwrap());
}

#[test]
fn unequal_counts_compare_distributions() {
    let real = waves(48, 16, 5);
    let reference = SwdReference::new(&real, 48, 16, &small_settings(1)).unwrap();
    // The first 16 real images are a smaller sample of the same distribution.
    let subset = reference.score(&real[..16 * 16 * 16 * 3], 16).unwrap();
    let noise: Vec<u8> = seeds::uniform_noise(9, 16, 16 * 16 * 3)
        .iter()
        .map(|v| (v * 256.0) as u8)
        .collect();
    let noisy = reference.score(&noise, 16).unwrap();
    println!("subset {subset:?}\nnoise {noisy:?}");
    assert!(
        subset.mean > 0.0 && subset.mean < noisy.mean / 5.0,
        "{subset:?} vs {noisy:?}"
    );
}

#[test]
fn bad_inputs_are_named() {
    let real = waves(16, 16, 1);
    let settings = small_settings(1);
    let message = |r: Result<SwdReference>| r.unwrap_err().to_string();
    assert!(message(SwdReference::new(&real, 15, 16, &settings)).contains("15 real images are too few"));
    assert!(message(SwdReference::new(&real[1..], 16, 16, &settings)).contains("12287 bytes"));
    assert!(message(SwdReference::new(&real[..16 * 8 * 8 * 3], 16, 8, &settings)).contains("side 8"));
    let none = SwdSettings {
        directions: 0,
        ..settings
    };
    assert!(message(SwdReference::new(&real, 16, 16, &none)).contains("directions"));

    let reference = SwdReference::new(&real, 16, 16, &settings).unwrap();
    let larger = waves(16, 20, 2);
    let err = reference.score(&larger, 16).unwrap_err().to_string();
    assert!(
        err.contains("generated pixels") && err.contains("16x16") && err.contains("as if they were 20x20"),
        "{err}"
    );
    assert!(
        reference
            .score(&real[..3 * 16 * 16 * 3], 3)
            .unwrap_err()
            .to_string()
            .contains("too few")
    );
}

/// Box blur of radius 1, three times (close to a Gaussian of sigma 1.4).
fn blurred(pixels: &[u8], size: usize) -> Vec<u8> {
    let mut out = pixels.to_vec();
    for _ in 0..3 {
        let from = out.clone();
        for (image, dst) in from
            .chunks_exact(size * size * 3)
            .zip(out.chunks_exact_mut(size * size * 3))
        {
            for y in 0..size {
                for x in 0..size {
                    for c in 0..3 {
                        let (mut sum, mut n) = (0u32, 0u32);
                        for yy in y.saturating_sub(1)..(y + 2).min(size) {
                            for xx in x.saturating_sub(1)..(x + 2).min(size) {
                                sum += u32::from(image[(yy * size + xx) * 3 + c]);
                                n += 1;
                            }
                        }
                        dst[(y * size + x) * 3 + c] = ((sum + n / 2) / n) as u8;
                    }
                }
            }
        }
    }
    out
}

/// Every channel kept to 4 values.
fn quantised(pixels: &[u8]) -> Vec<u8> {
    pixels.iter().map(|&v| (v / 64) * 64 + 32).collect()
}

#[test]
fn shared_faces_rank_real_far_above_noise_blur_and_quantisation() {
    let faces = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("..")
        .join("shared/data/faces");
    if !faces.is_dir() {
        println!("skipped: no shared faces at {}", faces.display());
        return;
    }
    let (size, count) = (40u32, 512usize);
    let data = crate::dataset::load(&faces, size, 2 * count + 64).unwrap();
    assert!(data.len() >= 2 * count, "only {} faces decoded", data.len());
    let bytes = data.image_bytes() * count;
    let (first, next) = (&data.pixels[..bytes], &data.pixels[bytes..2 * bytes]);
    let settings = SwdSettings::default();

    let started = Instant::now();
    let reference = SwdReference::new(first, count, size, &settings).unwrap();
    let built = started.elapsed();
    let started = Instant::now();
    let real = reference.score(next, count).unwrap();
    let scored = started.elapsed();
    println!("reference built in {built:.2?}, scored in {scored:.2?} ({count} vs {count}, {settings:?})");

    let noise: Vec<u8> = seeds::uniform_noise(3, count, data.image_bytes())
        .iter()
        .map(|v| (v * 256.0) as u8)
        .collect();
    let noise = reference.score(&noise, count).unwrap();
    let blur = reference.score(&blurred(next, size as usize), count).unwrap();
    let quant = reference.score(&quantised(next), count).unwrap();
    let warm = reference.score(&shift_red(next, 20), count).unwrap();
    let warm_self = reference.score(&shift_red(first, 20), count).unwrap();
    // Interleaved halves of the same 1024 faces: the file order (age first) no longer differs.
    let (even, odd): (Vec<&[u8]>, Vec<&[u8]>) = data.pixels[..2 * bytes]
        .chunks_exact(2 * data.image_bytes())
        .map(|pair| pair.split_at(data.image_bytes()))
        .unzip();
    let interleaved = SwdReference::new(&even.concat(), count, size, &settings)
        .unwrap()
        .score(&odd.concat(), count)
        .unwrap();
    let show = |name: &str, s: &SwdScore| println!("{name:>16}: mean {:8.1}  levels {:.1?}", s.mean, s.levels);
    show("real vs real", &real);
    show("real vs noise", &noise);
    show("real vs blurred", &blur);
    show("real vs 4 levels", &quant);
    show("real vs red +20", &warm);
    show("first vs its red+20", &warm_self);
    show("even vs odd", &interleaved);

    let means: Vec<f64> = (1..=5)
        .map(|seed| {
            let reference = SwdReference::new(first, count, size, &SwdSettings { seed, ..settings }).unwrap();
            reference.score(next, count).unwrap().mean
        })
        .collect();
    let average = means.iter().sum::<f64>() / means.len() as f64;
    let spread = means.iter().map(|m| (m - average).powi(2)).sum::<f64>() / (means.len() - 1) as f64;
    println!(
        "real vs real over 5 seeds: {means:.1?}, mean {average:.1}, std {:.1} ({:.1}%)",
        spread.sqrt(),
        100.0 * spread.sqrt() / average
    );

    assert!(real.mean < noise.mean / 3.0, "real {real:?} vs noise {noise:?}");
    assert!(real.mean < blur.mean / 2.0, "real {real:?} vs blurred {blur:?}");
    assert!(real.mean < quant.mean / 2.0, "real {real:?} vs quantised {quant:?}");
    assert!(real.levels[0] < blur.levels[0] / 3.0, "blur shows in the finest level");
    // The same faces shifted in red: the details barely move, the residual far more than
    // another sample of faces does.
    let last = real.levels.len() - 1;
    assert!(
        warm_self.levels[0] < interleaved.levels[0],
        "{warm_self:?} vs {interleaved:?}"
    );
    assert!(
        warm_self.levels[last] > 2.0 * interleaved.levels[last],
        "{warm_self:?} vs {interleaved:?}"
    );
    assert!(
        means.iter().all(|m| (m - average).abs() < 0.25 * average),
        "seeds disagree: {means:?}"
    );
}
