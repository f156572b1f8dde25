use super::*;
use forger_common::init::fresh_state;
use forger_common::spec::JobSpec;
use image::RgbImage;

fn request(count: usize, walk: Option<Walk>) -> Request {
    Request {
        count,
        seed: 3,
        walk,
        scale: 1,
        grid: Some(PathBuf::from("grid.png")),
        images: None,
    }
}

fn walk(frames: usize) -> Option<Walk> {
    Some(Walk { frames, to_seed: 9 })
}

/// A step-0 checkpoint of a small model (40x40 images, narrow layers) in `dir`.
fn small_checkpoint(dir: &Path) -> (PathBuf, JobSpec) {
    let text = r#"
version = 1
[data]
path = "unused"
[model]
d_filters = [16, 8, 4]
g_filters = [16, 8, 4]
[train]
seed = 5
"#;
    let spec = JobSpec::parse(text, "test spec").unwrap();
    let path = dir.join(checkpoint::file_name(0));
    checkpoint::save(&path, &spec, &fresh_state(&spec)).unwrap();
    (path, spec)
}

fn open(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// The cell of image `index` in a grid of images of side `side` in `columns` columns.
fn cell(grid: &RgbImage, index: usize, side: u32, columns: u32) -> RgbImage {
    let (x, y) = grid::cell_origin(index, side, columns);
    image::imageops::crop_imm(grid, x, y, side, side).to_image()
}

#[test]
fn walk_ends_are_the_two_draws_and_frames_lie_on_the_segment() {
    let dim = 16;
    let (a, b) = (seeds::uniform_noise(1, 3, dim), seeds::uniform_noise(2, 3, dim));
    let frames = 7;
    let walked = walk_noise(&a, &b, dim, frames);
    assert_eq!(walked.len(), 3 * frames * dim);
    for row in 0..3 {
        let (a, b) = (&a[row * dim..][..dim], &b[row * dim..][..dim]);
        let frame = |j: usize| &walked[(row * frames + j) * dim..][..dim];
        assert_eq!(
            frame(0).iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(frame(frames - 1), b);
        for j in 0..frames {
            let t = j as f64 / (frames - 1) as f64;
            for k in 0..dim {
                let expected = (f64::from(a[k]) + (f64::from(b[k]) - f64::from(a[k])) * t) as f32;
                assert_eq!(frame(j)[k], expected, "row {row} frame {j} value {k}");
                let (lo, hi) = (a[k].min(b[k]), a[k].max(b[k]));
                assert!((lo..=hi).contains(&frame(j)[k]) && frame(j)[k] < 1.0);
                if j > 0 {
                    // Each value moves one way only, from a towards b.
                    let step = frame(j)[k] - frame(j - 1)[k];
                    assert!(step == 0.0 || step.signum() == (b[k] - a[k]).signum());
                }
            }
        }
    }
}

#[test]
fn walk_of_binary_fractions_is_exact() {
    // Two rows of two values; quarters are exact in f32.
    let walked = walk_noise(&[0.0, 0.75, 0.5, 0.5], &[1.0, 0.25, 0.5, 0.0], 2, 5);
    let expected = [
        [0.0, 0.75],
        [0.25, 0.625],
        [0.5, 0.5],
        [0.75, 0.375],
        [1.0, 0.25],
        [0.5, 0.5],
        [0.5, 0.375],
        [0.5, 0.25],
        [0.5, 0.125],
        [0.5, 0.0],
    ];
    assert_eq!(walked, expected.concat());
}

#[test]
fn a_walk_request_draws_count_walks_in_grid_order() {
    let req = request(2, walk(4));
    let dim = 16;
    let noise = req.noise(dim);
    assert_eq!(noise.len(), 2 * 4 * dim);
    let (a, b) = (seeds::uniform_noise(3, 2, dim), seeds::uniform_noise(9, 2, dim));
    assert_eq!(noise, walk_noise(&a, &b, dim, 4));
    assert_eq!(&noise[4 * dim..5 * dim], &a[dim..]);
    assert_eq!(request(2, None).noise(dim), a);
    assert_eq!((req.total(), req.columns()), (8, 4));
    assert_eq!((request(5, None).total(), request(5, None).columns()), (5, 3));
}

#[test]
fn file_names_sort_in_grid_order() {
    let plain = request(12, None);
    assert_eq!(plain.image_file_name(0), "0000.png");
    assert_eq!(plain.image_file_name(11), "0011.png");
    let walks = request(3, walk(12));
    assert_eq!(walks.image_file_name(0), "0000-00.png");
    assert_eq!(walks.image_file_name(13), "0001-01.png");
    assert_eq!(walks.image_file_name(35), "0002-11.png");
    assert_eq!(request(1, walk(200)).image_file_name(150), "0000-150.png");
    let names: Vec<String> = (0..36).map(|i| walks.image_file_name(i)).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
}

#[test]
fn out_of_range_flags_are_named() {
    let problem = |req: Request| match req.check() {
        Err(WorkerError::Usage(message)) => message,
        other => panic!("expected a usage error, got {other:?}"),
    };
    assert!(request(4, walk(2)).check().is_ok());
    assert!(request(MAX_COUNT, None).check().is_ok());
    assert!(problem(request(4, walk(1))).contains("--interpolate"));
    assert!(problem(request(4, walk(MAX_FRAMES + 1))).contains("--interpolate"));
    assert!(problem(request(0, None)).contains("--count"));
    assert!(problem(request(0, walk(3))).contains("--count"));
    assert!(problem(request(MAX_COUNT + 1, None)).contains("--count"));
    let too_many = problem(request(MAX_IMAGES / 4 + 1, walk(4)));
    assert!(
        too_many.contains("--count") && too_many.contains("--interpolate"),
        "{too_many}"
    );
    let mut scaled = request(4, None);
    scaled.scale = 0;
    assert!(problem(scaled.clone()).contains("--scale"));
    scaled.scale = MAX_SCALE + 1;
    assert!(problem(scaled).contains("--scale"));
    let mut jpeg = request(4, None);
    jpeg.grid = Some(PathBuf::from("faces.jpg"));
    assert!(problem(jpeg).contains("--out"));
    let mut nowhere = request(4, None);
    nowhere.grid = None;
    assert!(problem(nowhere.clone()).contains("--images"));
    nowhere.images = Some(PathBuf::from("faces"));
    assert!(nowhere.check().is_ok());
    // Every problem at once.
    let mut all = request(0, walk(1));
    all.scale = 0;
    let message = problem(all);
    for flag in ["--count", "--interpolate", "--scale"] {
        assert!(message.contains(flag), "{message}");
    }
    // A grid too large to hold; single images of the same draw are fine.
    let mut huge = request(MAX_COUNT, None);
    huge.scale = MAX_SCALE;
    assert!(huge.check().is_ok());
    assert!(matches!(huge.check_grid(40), Err(WorkerError::Usage(m)) if m.contains("--scale")));
    huge.grid = None;
    huge.images = Some(PathBuf::from("faces"));
    assert!(huge.check_grid(40).is_ok());
    assert!(request(64, walk(8)).check_grid(40).is_ok());
}

#[test]
fn walks_start_and_end_at_the_two_seeds_faces() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let (checkpoint, spec) = small_checkpoint(dir.path());
    let size = spec.data.image_size;
    let (count, frames, scale) = (3, 4, 2);
    let walks = Request {
        count,
        seed: 11,
        walk: Some(Walk { frames, to_seed: 12 }),
        scale,
        grid: Some(dir.path().join("walks.png")),
        images: Some(dir.path().join("walks")),
    };
    let written = generate(&checkpoint, &walks, Device::Cpu).unwrap();
    let side = size * scale;
    let columns = frames as u32;
    let expected_grid = (
        columns * side + (columns + 1) * 2,
        count as u32 * side + (count as u32 + 1) * 2,
    );
    assert_eq!(
        written,
        Written {
            images: count * frames,
            grid: Some(expected_grid),
            files: count * frames
        }
    );
    let grid_image = open(&dir.path().join("walks.png"));
    assert_eq!(grid_image.dimensions(), expected_grid);
    let mut files: Vec<String> = std::fs::read_dir(dir.path().join("walks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        (0..count * frames)
            .map(|i| walks.image_file_name(i))
            .collect::<Vec<_>>()
    );
    for (i, name) in files.iter().enumerate() {
        let single = open(&dir.path().join("walks").join(name));
        assert_eq!(single.dimensions(), (side, side), "{name}");
        assert_eq!(
            single,
            cell(&grid_image, i, side, columns),
            "{name} differs from its grid cell"
        );
    }

    // Plain draws from each seed, unscaled, one image per file.
    let draw_seed = |seed: u64, name: &str| -> Vec<RgbImage> {
        let plain = Request {
            count,
            seed,
            walk: None,
            scale: 1,
            grid: None,
            images: Some(dir.path().join(name)),
        };
        let written = generate(&checkpoint, &plain, Device::Cpu).unwrap();
        assert_eq!((written.files, written.grid), (count, None));
        (0..count)
            .map(|i| open(&dir.path().join(name).join(plain.image_file_name(i))))
            .collect()
    };
    let (from, to) = (draw_seed(11, "from"), draw_seed(12, "to"));
    assert!(from != to, "two seeds drew the same faces");
    let upscaled = |image: &RgbImage| grid::image(&grid::upscale(image.as_raw(), 1, size, scale), side);
    for row in 0..count {
        let first = open(&dir.path().join("walks").join(walks.image_file_name(row * frames)));
        let last = open(
            &dir.path()
                .join("walks")
                .join(walks.image_file_name(row * frames + frames - 1)),
        );
        assert_eq!(
            first,
            upscaled(&from[row]),
            "walk {row} does not start at --seed's face {row}"
        );
        assert_eq!(
            last,
            upscaled(&to[row]),
            "walk {row} does not end at --to-seed's face {row}"
        );
    }
    // The middle frames are other faces.
    let middle = open(&dir.path().join("walks").join(walks.image_file_name(1)));
    assert!(middle != upscaled(&from[0]) && middle != upscaled(&to[0]));
}

#[test]
fn a_plain_draw_keeps_its_near_square_grid() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let (checkpoint, spec) = small_checkpoint(dir.path());
    let size = spec.data.image_size;
    let plain = Request {
        count: 5,
        seed: 3,
        walk: None,
        scale: 1,
        grid: Some(dir.path().join("faces.png")),
        images: Some(dir.path().join("faces")),
    };
    let written = generate(&checkpoint, &plain, Device::Cpu).unwrap();
    assert_eq!(written.grid, Some((3 * size + 4 * 2, 2 * size + 3 * 2)));
    let grid_image = open(&dir.path().join("faces.png"));
    assert_eq!(std::fs::read_dir(dir.path().join("faces")).unwrap().count(), 5);
    for i in 0..5 {
        let single = open(&dir.path().join("faces").join(plain.image_file_name(i)));
        assert_eq!(single, cell(&grid_image, i, size, 3), "face {i}");
    }
    // The same draw as the generator's own sampling of the seed's noise in one batch.
    let mut replica = Replica::new(&spec.model, size as usize, Device::Cpu).unwrap();
    let ckpt = checkpoint::load(&checkpoint).unwrap();
    replica
        .set_params(Net::Generator, &ckpt.state.generator.params)
        .unwrap();
    replica.set_batch_norm_running(&ckpt.state.batch_norm).unwrap();
    let noise = crate::replica::noise(3, 5, spec.model.noise_dim as usize, Device::Cpu).unwrap();
    let expected = grid::tile(&replica.sample(&noise).unwrap(), 5, size);
    assert_eq!(grid_image, expected);
}
