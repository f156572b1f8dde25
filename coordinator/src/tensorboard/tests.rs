//! The writer's files read back by a TFRecord reader written here from the format's
//! description, independently of the writer's framing code.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use forger_proto::tensorboard::{Event, event, summary};
use image::{DynamicImage, GrayImage, ImageFormat, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use prost::Message;

use super::*;

/// Why reading stopped before the end of the bytes.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The bytes end inside the record starting at `offset`: a torn write.
    Torn { offset: usize },
    /// The length of the record at `offset` does not match its CRC.
    LengthCrc { offset: usize },
    /// The data of the record at `offset` does not match its CRC.
    DataCrc { offset: usize },
}

/// The records' data up to the first problem, and the problem if there is one.
fn read_records(bytes: &[u8]) -> (Vec<Vec<u8>>, Option<Stop>) {
    // Spelled as the format's description writes it, not as the writer's rotate_right.
    #[allow(clippy::manual_rotate)]
    fn mask(crc: u32) -> u32 {
        ((crc >> 15) | (crc << 17)).wrapping_add(0xa282ead8)
    }
    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }
    let mut records = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        if rest.len() < 12 {
            return (records, Some(Stop::Torn { offset }));
        }
        if mask(crc32c::crc32c(&rest[..8])) != u32_at(rest, 8) {
            return (records, Some(Stop::LengthCrc { offset }));
        }
        let length = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
        if rest.len() < 12 + length + 4 {
            return (records, Some(Stop::Torn { offset }));
        }
        let data = &rest[12..12 + length];
        if mask(crc32c::crc32c(data)) != u32_at(rest, 12 + length) {
            return (records, Some(Stop::DataCrc { offset }));
        }
        records.push(data.to_vec());
        offset += 12 + length + 4;
    }
    (records, None)
}

fn events(records: &[Vec<u8>]) -> Vec<Event> {
    records.iter().map(|r| Event::decode(r.as_slice()).unwrap()).collect()
}

/// The only file in `dir`.
fn only_file(dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

fn png(image: impl Into<DynamicImage>) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.into().write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

fn faces_like(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| Rgb([(x * 40) as u8, (y * 60) as u8, 128]))
}

/// The one value of a summary event.
fn value(event: &Event) -> &summary::Value {
    match &event.what {
        Some(event::What::Summary(summary)) => {
            assert_eq!(summary.value.len(), 1);
            &summary.value[0]
        }
        other => panic!("not a summary: {other:?}"),
    }
}

fn simple_value(event: &Event) -> (String, i64, f32) {
    let v = value(event);
    match v.value {
        Some(summary::value::Value::SimpleValue(x)) => (v.tag.clone(), event.step, x),
        ref other => panic!("not a scalar: {other:?}"),
    }
}

#[test]
fn scalars_and_an_image_read_back() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("runs/tensorboard");
    let before = wall_time();
    let mut writer = EventWriter::create(&dir).unwrap();
    writer.scalar("loss_d", 1, 0.693).unwrap();
    writer.scalar("loss_g", 1, 2.25).unwrap();
    writer.scalar("loss_d", 2, 0.1).unwrap();
    let picture = png(faces_like(6, 4));
    writer.image_png("samples", 2, &picture, 6, 4).unwrap();
    writer.flush().unwrap();
    let after = wall_time();

    let path = only_file(&dir);
    assert_eq!(path, writer.path());
    let name = path.file_name().unwrap().to_str().unwrap();
    let pid = format!(".{}.forger", std::process::id());
    assert!(
        name.starts_with("events.out.tfevents.") && name.ends_with(&pid),
        "{name}"
    );

    let (records, stop) = read_records(&std::fs::read(&path).unwrap());
    assert_eq!(stop, None);
    let events = events(&records);
    assert_eq!(events.len(), 5);
    assert_eq!(events[0].what, Some(event::What::FileVersion("brain.Event:2".into())));
    for event in &events {
        assert!(
            (before..=after).contains(&event.wall_time),
            "{} not in {before}..{after}",
            event.wall_time
        );
    }
    assert_eq!(simple_value(&events[1]), ("loss_d".into(), 1, 0.693f64 as f32));
    assert_eq!(simple_value(&events[2]), ("loss_g".into(), 1, 2.25));
    assert_eq!(simple_value(&events[3]), ("loss_d".into(), 2, 0.1f64 as f32));

    assert_eq!(events[4].step, 2);
    let v = value(&events[4]);
    assert_eq!(v.tag, "samples");
    let Some(summary::value::Value::Image(image)) = &v.value else {
        panic!("not an image: {v:?}");
    };
    assert_eq!((image.width, image.height, image.colorspace), (6, 4, 3));
    assert_eq!(image.encoded_image_string, picture);
}

#[test]
fn writes_reach_the_file_at_flush() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = EventWriter::create(dir.path()).unwrap();
    let count = |path: &Path| read_records(&std::fs::read(path).unwrap()).0.len();
    // The header is flushed by create, so a viewer sees a valid log from the start.
    assert_eq!(count(writer.path()), 1);
    writer.scalar("loss_d", 1, 0.5).unwrap();
    assert_eq!(count(writer.path()), 1);
    writer.flush().unwrap();
    assert_eq!(count(writer.path()), 2);
}

#[test]
fn a_torn_last_record_is_detectable() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = EventWriter::create(dir.path()).unwrap();
    for step in 1..=3 {
        writer.scalar("loss_d", step, step as f64 / 4.0).unwrap();
    }
    writer.flush().unwrap();
    let bytes = std::fs::read(writer.path()).unwrap();
    let (records, stop) = read_records(&bytes);
    assert_eq!((records.len(), stop), (4, None));
    let last = bytes.len() - (12 + records[3].len() + 4);

    // Cut inside the length, its CRC, the data and the data's CRC of the last record.
    for cut in [last + 3, last + 10, last + 14, bytes.len() - 1] {
        let (kept, stop) = read_records(&bytes[..cut]);
        assert_eq!(stop, Some(Stop::Torn { offset: last }), "cut at {cut}");
        assert_eq!(kept, records[..3], "cut at {cut}");
        assert_eq!(simple_value(&events(&kept)[2]), ("loss_d".into(), 2, 0.5));
    }
}

#[test]
fn a_changed_byte_fails_its_crc() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = EventWriter::create(dir.path()).unwrap();
    writer.scalar("loss_g", 7, 1.5).unwrap();
    writer.flush().unwrap();
    let bytes = std::fs::read(writer.path()).unwrap();
    let second = read_records(&bytes).0[0].len() + 16;

    let mut length = bytes.clone();
    length[second] ^= 1;
    assert_eq!(read_records(&length).1, Some(Stop::LengthCrc { offset: second }));
    let mut data = bytes.clone();
    data[second + 13] ^= 0x40;
    assert_eq!(read_records(&data).1, Some(Stop::DataCrc { offset: second }));
}

#[test]
fn the_crc_is_castagnoli() {
    // The standard check value of CRC-32C; plain CRC-32 (zlib's) gives 0xcbf43926.
    assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
}

#[test]
fn an_image_that_is_not_the_png_it_claims_is_refused_unwritten() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = EventWriter::create(dir.path()).unwrap();
    let picture = png(faces_like(6, 4));
    let jpeg = {
        let mut out = Cursor::new(Vec::new());
        DynamicImage::from(faces_like(6, 4))
            .write_to(&mut out, ImageFormat::Jpeg)
            .unwrap();
        out.into_inner()
    };
    let path = writer.path().display().to_string();
    for (bytes, width, height, why) in [
        (&picture, 4, 6, "is 6x4, not the 4x6"),
        (&jpeg, 6, 4, "not start like a PNG"),
        (&picture[..20].to_vec(), 6, 4, "not start like a PNG"),
    ] {
        let error = writer
            .image_png("samples", 1, bytes, width, height)
            .unwrap_err()
            .to_string();
        assert!(error.contains(&path) && error.contains(why), "{error}");
    }
    writer.flush().unwrap();
    assert_eq!(read_records(&std::fs::read(writer.path()).unwrap()).0.len(), 1);
}

#[test]
fn the_colorspace_follows_the_png() {
    let header = |image: DynamicImage| PngHeader::parse(&png(image)).unwrap();
    let grey = GrayImage::from_pixel(3, 5, Luma([9]));
    let rgba = RgbaImage::from_pixel(7, 2, Rgba([1, 2, 3, 4]));
    assert_eq!(
        header(grey.into()),
        PngHeader {
            width: 3,
            height: 5,
            colorspace: 1
        }
    );
    assert_eq!(
        header(faces_like(40, 40).into()),
        PngHeader {
            width: 40,
            height: 40,
            colorspace: 3
        }
    );
    assert_eq!(
        header(rgba.into()),
        PngHeader {
            width: 7,
            height: 2,
            colorspace: 4
        }
    );
}

#[test]
fn writers_started_together_get_their_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = EventWriter::create(dir.path()).unwrap();
    let mut second = EventWriter::create(dir.path()).unwrap();
    assert_ne!(first.path(), second.path());
    first.scalar("loss_d", 1, 1.0).unwrap();
    second.scalar("loss_d", 1, 2.0).unwrap();
    first.flush().unwrap();
    second.flush().unwrap();
    for (writer, expected) in [(&first, 1.0), (&second, 2.0)] {
        let (records, stop) = read_records(&std::fs::read(writer.path()).unwrap());
        assert_eq!(stop, None);
        assert_eq!(simple_value(&events(&records)[1]).2, expected);
    }
}

#[test]
fn a_step_beyond_int64_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = EventWriter::create(dir.path()).unwrap();
    let error = writer.scalar("loss_d", u64::MAX, 1.0).unwrap_err().to_string();
    assert!(error.contains("beyond TensorBoard's int64"), "{error}");
}
