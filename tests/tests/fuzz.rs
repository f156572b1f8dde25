//! Fuzzing what strangers and users hand forger: data-connection frames, gRPC messages, job
//! specs and image files. Each property runs a few hundred random cases in CI; for a longer
//! hunt set `PROPTEST_CASES` (docs/SECURITY.md records the runs made so far). Cases proptest
//! finds are kept by it under `tests/proptest-regressions/` and replayed first on every run;
//! hand-made cases live in `tests/corpus/fuzz/` and are checked by the `corpus_*` tests.

use std::path::PathBuf;

use forger_common::spec::JobSpec;
use forger_proto::data::{self, FrameError, FrameReader, MAX_HANDSHAKE_BYTES};
use forger_proto::pb;
use forger_tests::repo_root;
use futures::executor::block_on;
use proptest::prelude::*;
use prost::Message;

/// The payload limit the coordinator reads gradient frames with, scaled down so that random
/// lengths often land on both sides of it.
const MAX_PAYLOAD: usize = 4096;

fn corpus(kind: &str) -> Vec<PathBuf> {
    let dir = repo_root().join("tests/corpus/fuzz").join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no cases", dir.display());
    files
}

/// Reads every frame of `bytes` as gradient chunks, as the coordinator does; returns how many
/// decoded and how reading ended. Never panics, never reserves more than the limits.
fn read_frames(bytes: &[u8]) -> (usize, Result<(), FrameError>) {
    block_on(async {
        let mut reader = FrameReader::new(bytes, MAX_PAYLOAD);
        let mut frames = 0;
        loop {
            match reader.read::<pb::GradientChunk>().await {
                Ok(Some((_, payload))) => {
                    assert!(payload.len() <= MAX_PAYLOAD);
                    frames += 1;
                }
                Ok(None) => return (frames, Ok(())),
                Err(e) => return (frames, Err(e)),
            }
        }
    })
}

/// A valid spec's text, for mutation.
const VALID_SPEC: &str = "version = 1\n[data]\npath = \"faces\"\nimage_size = 40\nlimit = 100\n[model]\n\
    d_filters = [64, 32, 16]\ng_filters = [64, 32, 16]\ndropout = 0.0\n[train]\nsteps = 10\nbatch_size = 16\n\
    [cluster]\nworkers = 2\n[checkpoint]\nevery = 5\n";

/// A spec either parses into one that passes its own checks, or is refused with a message
/// naming a field or a line: never a panic, never an accepted out-of-range value.
fn check_spec(text: &str) {
    match JobSpec::parse(text, "fuzz") {
        Ok(spec) => assert!(spec.validate().is_empty(), "accepted an invalid spec:\n{text}"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// An image file either decodes into exactly `size x size x 3` bytes or is skipped with a
/// reason; never a panic, and never a decode of more than the limits.
fn check_image(bytes: &[u8], name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    match forger_common::dataset::prepare_image(&path, 8) {
        Ok(pixels) => assert_eq!(pixels.len(), 8 * 8 * 3),
        Err(skipped) => assert!(!skipped.reason.is_empty() || bytes.is_empty(), "{skipped:?}"),
    }
}

/// Small valid images to mutate: a PNG and a JPEG from the `image` crate.
fn seed_images() -> Vec<(Vec<u8>, &'static str)> {
    let picture = image::RgbImage::from_fn(12, 10, |x, y| image::Rgb([x as u8 * 20, y as u8 * 25, 77]));
    let mut out = Vec::new();
    for (format, name) in [
        (image::ImageFormat::Png, "seed.png"),
        (image::ImageFormat::Jpeg, "seed.jpg"),
    ] {
        let mut bytes = std::io::Cursor::new(Vec::new());
        picture.write_to(&mut bytes, format).unwrap();
        out.push((bytes.into_inner(), name));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_on_a_data_connection_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_frames(&bytes);
    }

    /// Frames that are well formed except for their lengths: the limits hold whatever they say.
    #[test]
    fn frame_lengths_are_held_to_the_limits(header_len in any::<u32>(), payload_len in any::<u32>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = header_len.to_le_bytes().to_vec();
        bytes.extend_from_slice(&payload_len.to_le_bytes());
        bytes.extend_from_slice(&tail);
        let (_, ended) = read_frames(&bytes);
        if payload_len as usize > MAX_PAYLOAD {
            prop_assert!(ended.is_err());
        }
    }

    /// What is written is read back exactly, and cutting the stream anywhere is an error or a
    /// clean end between frames, never a wrong frame.
    #[test]
    fn frames_round_trip_and_truncation_is_detected(step in any::<u64>(), offset in any::<u64>(), values in proptest::collection::vec(any::<u8>(), 0..256), cut in any::<prop::sample::Index>()) {
        let chunk = pb::GradientChunk { step, offset, last: true, ..Default::default() };
        let mut bytes = Vec::new();
        block_on(data::write_frame(&mut bytes, &chunk, &values)).unwrap();
        let whole = block_on(async {
            let mut reader = FrameReader::new(bytes.as_slice(), MAX_PAYLOAD);
            reader.read::<pb::GradientChunk>().await
        }).unwrap().unwrap();
        prop_assert_eq!(whole.0, chunk);
        prop_assert_eq!(&whole.1[..], &values[..]);
        let cut = cut.index(bytes.len());
        let (frames, ended) = read_frames(&bytes[..cut]);
        prop_assert_eq!(frames, 0);
        prop_assert!(cut == 0 || ended.is_err());
    }

    /// The handshake reader, which runs before the peer is known, holds its smaller limit.
    #[test]
    fn a_handshake_never_reads_past_its_limit(header_len in any::<u32>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = data::DATA_MAGIC.to_vec();
        bytes.extend_from_slice(&header_len.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&body);
        let result = block_on(async {
            let mut reader = FrameReader::handshake(bytes.as_slice());
            reader.read_magic().await?;
            reader.read::<pb::DataHello>().await
        });
        if header_len as usize > MAX_HANDSHAKE_BYTES {
            let too_large = matches!(result, Err(FrameError::TooLarge { .. }));
            prop_assert!(too_large);
        }
    }

    #[test]
    fn random_bytes_as_grpc_messages_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = pb::WorkerMessage::decode(bytes.as_slice());
        let _ = pb::JoinRequest::decode(bytes.as_slice());
        let _ = pb::DataHello::decode(bytes.as_slice());
        let _ = pb::GradientChunk::decode(bytes.as_slice());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_text_as_a_spec_is_parsed_or_refused(text in "\\PC{0,200}") {
        check_spec(&text);
    }

    /// A valid spec with one line replaced: the near misses a user types.
    #[test]
    fn a_valid_spec_with_a_line_changed_is_parsed_or_refused(line in any::<prop::sample::Index>(), replacement in "[a-z_]{1,12} = (-?[0-9]{1,20}|\"[a-z]{0,8}\"|\\[[0-9, -]{0,12}\\]|[0-9.e+-]{1,10}|true)") {
        let mut lines: Vec<&str> = VALID_SPEC.lines().collect();
        let at = line.index(lines.len());
        lines[at] = &replacement;
        check_spec(&lines.join("\n"));
    }

    /// Valid images with bytes flipped or cut short, in every format's clothing.
    #[test]
    fn a_damaged_image_is_loaded_or_skipped(seed in 0usize..2, flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8), cut in any::<prop::sample::Index>()) {
        let (mut bytes, name) = seed_images().swap_remove(seed);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let keep = 1 + cut.index(bytes.len());
        bytes.truncate(keep);
        check_image(&bytes, name);
    }

    #[test]
    fn random_bytes_as_an_image_are_skipped(bytes in proptest::collection::vec(any::<u8>(), 0..256), name in "[a-z]{1,4}\\.(png|jpg|gif|webp|bmp|dat)") {
        check_image(&bytes, &name);
    }
}

#[test]
fn corpus_specs_are_parsed_or_refused_with_their_field() {
    for file in corpus("specs") {
        let Ok(text) = String::from_utf8(std::fs::read(&file).unwrap()) else {
            // Not text at all: refused when the file is read, naming it.
            let error = JobSpec::load(&file).expect_err("a spec that is not UTF-8").to_string();
            assert!(error.contains(&file.display().to_string()), "{error}");
            continue;
        };
        check_spec(&text);
        // Each case says the field its message must name on its first line: `# expect: FIELD`.
        if let Some(field) = text.lines().next().and_then(|l| l.strip_prefix("# expect: ")) {
            let error = JobSpec::parse(&text, "corpus")
                .expect_err(&file.display().to_string())
                .to_string();
            assert!(error.contains(field.trim()), "{}: {error}", file.display());
        }
    }
}

#[test]
fn corpus_frames_never_panic_and_are_refused() {
    for file in corpus("frames") {
        let bytes = std::fs::read(&file).unwrap();
        let (_, ended) = read_frames(&bytes);
        assert!(ended.is_err(), "{} was read without an error", file.display());
    }
}

#[test]
fn corpus_images_are_skipped_with_a_reason() {
    for file in corpus("images") {
        let bytes = std::fs::read(&file).unwrap();
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        check_image(&bytes, &name);
        let skipped = forger_common::dataset::prepare_image(&file, 8).expect_err(&name);
        assert!(!skipped.reason.is_empty(), "{name}");
    }
}
