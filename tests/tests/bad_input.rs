//! A dataset folder holding what real folders hold: every file either loads as the picture it
//! is, or is skipped with its reason, counted in one summary line and listed in the run's
//! report file. Files the `image` crate cannot write come from `tests/corpus/images/`.

use std::path::{Path, PathBuf};

use forger_common::dataset::{self, MAX_SIDE, SkipKind};
use forger_tests::repo_root;
use image::{ImageBuffer, ImageFormat, Luma, Rgb, RgbImage, Rgba, RgbaImage};

const SIZE: u32 = 8;

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/corpus/images").join(name)
}

/// A 16x16 picture: red on the left half, blue on the right.
fn halves() -> RgbImage {
    RgbImage::from_fn(16, 16, |x, _| if x < 8 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) })
}

/// A PNG whose header claims `width x height` 16-bit RGBA pixels, with a few bytes of pixel
/// data: what a decompression bomb looks like until it is inflated (a decoder that believed it
/// would allocate width x height x 8 bytes).
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        png.extend_from_slice(&crc.finalize().to_be_bytes());
    };
    let mut header = Vec::new();
    header.extend_from_slice(&width.to_be_bytes());
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[16, 6, 0, 0, 0]); // 16-bit, RGBA, deflate, no filter, no interlace
    chunk(b"IHDR", &header);
    // An empty zlib stream: the header is all a decoder may look at before refusing.
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    png
}

/// Every kind of file the issue lists, in one folder with a subfolder.
fn zoo(dir: &Path) {
    let save =
        |name: &str, image: &RgbImage, format: ImageFormat| image.save_with_format(dir.join(name), format).unwrap();
    save("good.png", &halves(), ImageFormat::Png);
    save("good.bmp", &halves(), ImageFormat::Bmp);
    save("good.gif", &halves(), ImageFormat::Gif);
    RgbaImage::from_fn(16, 16, |x, _| {
        if x < 8 {
            Rgba([255, 0, 0, 255])
        } else {
            Rgba([0, 0, 255, 255])
        }
    })
    .save_with_format(dir.join("good.webp"), ImageFormat::WebP)
    .unwrap();
    save("good.jpg", &halves(), ImageFormat::Jpeg);
    // Transparent on the right: over white, not whatever colour the pixels store (black).
    RgbaImage::from_fn(16, 16, |x, _| {
        if x < 8 {
            Rgba([255, 0, 0, 255])
        } else {
            Rgba([0, 0, 0, 0])
        }
    })
    .save(dir.join("alpha.png"))
    .unwrap();
    ImageBuffer::<Rgb<u16>, Vec<u16>>::from_fn(
        16,
        16,
        |x, _| if x < 8 { Rgb([65535, 0, 0]) } else { Rgb([0, 0, 65535]) },
    )
    .save(dir.join("sixteen-bit.png"))
    .unwrap();
    ImageBuffer::<Luma<u8>, Vec<u8>>::from_pixel(16, 16, Luma([200]))
        .save_with_format(dir.join("grey.jpg"), ImageFormat::Jpeg)
        .unwrap();
    for name in ["cmyk.jpg", "exif-rotate-90.jpg", "progressive.jpg"] {
        std::fs::copy(fixture(name), dir.join(name)).unwrap();
    }
    std::fs::create_dir(dir.join("nested")).unwrap();
    save("nested/deeper.png", &halves(), ImageFormat::Png);

    std::fs::write(dir.join("empty.jpg"), b"").unwrap();
    let mut jpeg = std::io::Cursor::new(Vec::new());
    RgbImage::from_fn(64, 64, |x, y| Rgb([x as u8 * 4, y as u8 * 4, 99]))
        .write_to(&mut jpeg, ImageFormat::Jpeg)
        .unwrap();
    let jpeg = jpeg.into_inner();
    std::fs::write(dir.join("truncated.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    // Cut near the end: decoders fill the missing rows with grey and say nothing.
    std::fs::write(dir.join("truncated-late.jpg"), &jpeg[..jpeg.len() * 9 / 10]).unwrap();
    std::fs::write(dir.join("notes.txt"), b"what these photos are").unwrap();
    std::fs::write(dir.join("text-named.png"), b"not a png at all").unwrap();
    save("tiny.png", &RgbImage::new(3, 3), ImageFormat::Png);
    std::fs::write(dir.join("bomb.png"), png_claiming(15_000, 15_000)).unwrap();
    std::fs::write(dir.join("too-wide.png"), png_claiming(MAX_SIDE + 1, 1)).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::symlink;
        symlink(dir, dir.join("nested/loop")).unwrap();
        symlink(dir.join("missing.jpg"), dir.join("dangling.jpg")).unwrap();
    }
}

/// Pixel (x, y) of a prepared image.
fn pixel(bytes: &[u8], x: u32, y: u32) -> [u8; 3] {
    let i = ((y * SIZE + x) * 3) as usize;
    [bytes[i], bytes[i + 1], bytes[i + 2]]
}

fn near(found: [u8; 3], expected: [u8; 3], name: &str) {
    let close = found.iter().zip(expected).all(|(&f, e)| f.abs_diff(e) <= 40);
    assert!(close, "{name}: {found:?}, expected about {expected:?}");
}

#[test]
fn every_file_loads_as_its_picture_or_is_skipped_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    zoo(dir.path());
    let data = dataset::load(dir.path(), SIZE, 0).unwrap();
    let name = |p: &Path| p.strip_prefix(dir.path()).unwrap().display().to_string();
    let loaded: Vec<String> = data.files.iter().map(|f| name(f)).collect();
    assert_eq!(
        loaded,
        [
            "alpha.png",
            "cmyk.jpg",
            "exif-rotate-90.jpg",
            "good.bmp",
            "good.gif",
            "good.jpg",
            "good.png",
            "good.webp",
            "grey.jpg",
            "nested/deeper.png",
            "progressive.jpg",
            "sixteen-bit.png",
        ]
    );
    let image = |file: &str| data.image(loaded.iter().position(|f| f == file).unwrap());
    let (left, right) = ((1, 4), (SIZE - 2, 4));
    for file in [
        "good.png",
        "good.bmp",
        "good.gif",
        "good.webp",
        "good.jpg",
        "sixteen-bit.png",
        "nested/deeper.png",
    ] {
        near(pixel(image(file), left.0, left.1), [255, 0, 0], file);
        near(pixel(image(file), right.0, right.1), [0, 0, 255], file);
    }
    near(
        pixel(image("alpha.png"), right.0, right.1),
        [255, 255, 255],
        "alpha.png",
    );
    near(pixel(image("grey.jpg"), 4, 4), [200, 200, 200], "grey.jpg");
    near(
        pixel(image("cmyk.jpg"), left.0, left.1),
        [0, 255, 255],
        "cmyk.jpg (cyan)",
    );
    near(
        pixel(image("cmyk.jpg"), right.0, right.1),
        [255, 255, 0],
        "cmyk.jpg (yellow)",
    );
    // Stored red-over-blue; upright (turned 90 degrees clockwise) red is on the right.
    near(
        pixel(image("exif-rotate-90.jpg"), left.0, left.1),
        [0, 0, 255],
        "exif-rotate-90.jpg",
    );
    near(
        pixel(image("exif-rotate-90.jpg"), right.0, right.1),
        [255, 0, 0],
        "exif-rotate-90.jpg",
    );
    near(pixel(image("progressive.jpg"), 4, 1), [255, 0, 0], "progressive.jpg");

    let skipped: Vec<(String, SkipKind)> = data.skipped.iter().map(|s| (name(&s.file), s.kind)).collect();
    let mut expected = vec![
        ("bomb.png".to_string(), SkipKind::TooLarge),
        ("empty.jpg".into(), SkipKind::Empty),
        ("notes.txt".into(), SkipKind::NotAnImage),
        ("text-named.png".into(), SkipKind::Damaged),
        ("tiny.png".into(), SkipKind::TooSmall),
        ("too-wide.png".into(), SkipKind::TooLarge),
        ("truncated.jpg".into(), SkipKind::Damaged),
        ("truncated-late.jpg".into(), SkipKind::Damaged),
    ];
    if cfg!(unix) {
        expected.push(("dangling.jpg".into(), SkipKind::Unreadable));
        expected.push(("nested/loop".into(), SkipKind::SeenFolder));
    }
    expected.sort();
    assert_eq!(skipped, expected, "{:#?}", data.skipped);
    for s in &data.skipped {
        assert!(!s.reason.is_empty(), "{s:?} gives no reason");
    }
    assert!(
        data.skipped.iter().any(|s| s.reason.contains("3x3")),
        "{:#?}",
        data.skipped
    );
}

/// A spec for the zoo folder, in `dir`.
fn zoo_spec(dir: &Path, data: &Path, batch: u32) -> PathBuf {
    let spec = dir.join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "version = 1\n[data]\npath = \"{}\"\nimage_size = {SIZE}\n[model]\nd_filters = [2, 2, 2]\n\
             g_filters = [2, 2, 2]\n[train]\nsteps = 1\nbatch_size = {batch}\n[cluster]\nworkers = 1\n\
             [checkpoint]\nsamples = 4\n",
            data.display()
        ),
    )
    .unwrap();
    spec
}

/// The coordinator with one local worker on a folder holding the zoo, for a spec of `batch`;
/// returns its output and the run directory (inside `dir`).
fn run_on_zoo(dir: &Path, batch: u32) -> (std::process::Output, PathBuf) {
    let data = dir.join("zoo");
    std::fs::create_dir(&data).unwrap();
    zoo(&data);
    let run = dir.join("run");
    let out = forger_tests::processes::local_cluster_command(&zoo_spec(dir, &data, batch), &run, None, 1)
        .output()
        .unwrap();
    (out, run)
}

#[test]
fn the_coordinator_prints_one_summary_line_and_writes_the_report_file() {
    let dir = tempfile::tempdir().unwrap();
    let (out, run) = run_on_zoo(dir.path(), 4);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summaries: Vec<&str> = stderr.lines().filter(|l| l.contains(" skipped: ")).collect();
    assert_eq!(summaries.len(), 1, "{stderr}");
    assert!(
        summaries[0].contains("3 damaged") && summaries[0].contains("2 over the size limit"),
        "{}",
        summaries[0]
    );
    let report = std::fs::read_to_string(dataset::report_path(&run)).unwrap();
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines[0], "file\tkind\treason");
    let expected_rows = if cfg!(unix) { 10 } else { 8 };
    assert_eq!(lines.len(), 1 + expected_rows, "{report}");
    assert!(report.contains("truncated.jpg\tdamaged\t"), "{report}");
}

#[test]
fn a_folder_with_fewer_usable_images_than_a_batch_is_refused_with_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = run_on_zoo(dir.path(), 16);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("holds 12 usable images"), "{stderr}");
    assert!(stderr.contains("fewer than one batch of 16"), "{stderr}");
    assert!(!stderr.contains("started local worker"), "{stderr}");
}

/// Replaces `from` by `to` (of the same length) in a file, in place.
fn patch(file: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from} is not in {}", file.display()));
    bytes[at..at + from.len()].copy_from_slice(to.as_bytes());
    std::fs::write(file, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_another_format_or_spec_version_is_refused_with_the_reason() {
    use forger_tests::{TestCoordinator, tiny_data_folder, tiny_spec};
    for (from, to, says) in [
        ("forger-checkpoint-1", "forger-checkpoint-9", "forger-checkpoint-9"),
        ("version = 1", "version = 7", "version"),
    ] {
        let (dir, data) = tiny_data_folder();
        let run = dir.path().join("run");
        let spec = tiny_spec(&data, 1, 2);
        let coordinator = TestCoordinator::start(spec.clone(), &run, false, Some(1)).await;
        coordinator.finish(std::time::Duration::from_secs(120)).await.unwrap();
        let checkpoints = forger_common::checkpoint::list(&run.join("checkpoints")).unwrap();
        for (_, file) in &checkpoints {
            patch(file, from, to);
        }
        let resumed = TestCoordinator::start(spec, &run, true, Some(1)).await;
        let error = resumed
            .finish(std::time::Duration::from_secs(60))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("no checkpoint loads") && error.contains(says), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_copied_in_under_a_later_step_s_name_is_not_trusted_by_its_name() {
    use forger_tests::{TestCoordinator, tiny_data_folder, tiny_spec};
    let (dir, data) = tiny_data_folder();
    let run = dir.path().join("run");
    let spec = tiny_spec(&data, 1, 2);
    let coordinator = TestCoordinator::start(spec.clone(), &run, false, Some(1)).await;
    coordinator.finish(std::time::Duration::from_secs(120)).await.unwrap();
    let checkpoints = run.join("checkpoints");
    std::fs::copy(
        checkpoints.join("step-00000002.safetensors"),
        checkpoints.join("step-00000009.safetensors"),
    )
    .unwrap();
    let newest = forger_common::checkpoint::load_newest(&checkpoints).unwrap();
    let (path, checkpoint) = newest.found.expect("the real one loads");
    assert!(path.ends_with("step-00000002.safetensors"), "{}", path.display());
    assert_eq!(checkpoint.state.step, 2);
    let refused = newest
        .skipped
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    assert!(refused.contains("is named for step 9 but holds step 2"), "{refused}");
}
