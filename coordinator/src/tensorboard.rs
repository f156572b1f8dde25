//! TensorBoard event files, so a run can be watched in the viewer people already use.
//!
//! A file is a sequence of TFRecords, each framing one serialized `Event`
//! ([`forger_proto::tensorboard`]):
//!
//! ```text
//! u64 LE   length of the data
//! u32 LE   masked CRC32C of those 8 length bytes
//! [u8]     data
//! u32 LE   masked CRC32C of the data
//! ```
//!
//! where masking is `((crc >> 15) | (crc << 17)) + 0xa282ead8` (wrapping). The first record
//! holds only `file_version = "brain.Event:2"`. The length's own CRC lets a reader tell a torn
//! last record (a crash mid-write) from a huge one: TensorBoard stops there and shows the rest.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use forger_proto::tensorboard::{Event, Summary, event, summary};
use prost::Message;

use crate::error::{CoordinatorError, Result};

/// What the first record says: readers check the prefix "brain.Event:".
pub const FILE_VERSION: &str = "brain.Event:2";

/// Summary.Image.colorspace for the PNG colour types (TensorBoard's numbering).
const COLORSPACE_GREY: i32 = 1;
const COLORSPACE_GREY_ALPHA: i32 = 2;
const COLORSPACE_RGB: i32 = 3;
const COLORSPACE_RGBA: i32 = 4;

/// An open event file. Writes go through a buffer: call [`EventWriter::flush`] to make them
/// visible to TensorBoard (the trainer does at checkpoints). Dropping the writer flushes too,
/// but can only ignore a failure there.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` if needed and a new file `events.out.tfevents.<unix secs>.<host>.<pid>.forger`
    /// in it, starting with the file-version record. TensorBoard reads every file in the folder
    /// in name order, so a resumed run adds a later file instead of touching an earlier one.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir)
            .map_err(|e| CoordinatorError::io(format!("failed to create {}", dir.display()), e))?;
        let (path, file) = create_new_file(dir, unix_seconds(), &host_name(), std::process::id())?;
        let mut writer = EventWriter {
            path,
            file: BufWriter::new(file),
        };
        writer.write_event(Event {
            wall_time: wall_time(),
            step: 0,
            what: Some(event::What::FileVersion(FILE_VERSION.into())),
        })?;
        // The header goes out at once, so a viewer opened before the first flush sees a log.
        writer.flush()?;
        Ok(writer)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `value` for `tag` at `step`. TensorBoard stores scalars as f32, so the value is
    /// rounded to f32 (plenty for a chart; NaN and infinities pass through).
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        self.write_value(
            step,
            summary::Value {
                tag: tag.into(),
                value: Some(summary::value::Value::SimpleValue(value as f32)),
            },
        )
    }

    /// Records a PNG file's bytes as image `tag` at `step`. The PNG's own header must say
    /// `width` x `height`: a mismatch, or bytes that are not a PNG, is refused before anything
    /// is written, since TensorBoard would store them and fail only when shown.
    pub fn image_png(&mut self, tag: &str, step: u64, png: &[u8], width: u32, height: u32) -> Result<()> {
        let header = PngHeader::parse(png).map_err(|message| self.invalid(message))?;
        if (header.width, header.height) != (width, height) {
            return Err(self.invalid(format!(
                "image {tag:?}: the PNG is {}x{}, not the {width}x{height} given",
                header.width, header.height
            )));
        }
        // PNG caps each side at 2^31 - 1, so both fit TensorBoard's int32.
        let image = summary::Image {
            height: height as i32,
            width: width as i32,
            colorspace: header.colorspace,
            encoded_image_string: png.to_vec(),
        };
        self.write_value(
            step,
            summary::Value {
                tag: tag.into(),
                value: Some(summary::value::Value::Image(image)),
            },
        )
    }

    /// Hands everything written so far to the operating system, where TensorBoard reads it.
    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| CoordinatorError::io(format!("failed to write {}", self.path.display()), e))
    }

    fn write_value(&mut self, step: u64, value: summary::Value) -> Result<()> {
        let step =
            i64::try_from(step).map_err(|_| self.invalid(format!("step {step} is beyond TensorBoard's int64")))?;
        self.write_event(Event {
            wall_time: wall_time(),
            step,
            what: Some(event::What::Summary(Summary { value: vec![value] })),
        })
    }

    fn write_event(&mut self, event: Event) -> Result<()> {
        let data = event.encode_to_vec();
        let length = (data.len() as u64).to_le_bytes();
        let mut write = || -> std::io::Result<()> {
            self.file.write_all(&length)?;
            self.file.write_all(&masked_crc(&length).to_le_bytes())?;
            self.file.write_all(&data)?;
            self.file.write_all(&masked_crc(&data).to_le_bytes())
        };
        write().map_err(|e| CoordinatorError::io(format!("failed to write {}", self.path.display()), e))
    }

    /// An input error, named with the file like the I/O errors.
    fn invalid(&self, message: String) -> CoordinatorError {
        CoordinatorError::io(
            format!("failed to write {}", self.path.display()),
            std::io::Error::new(ErrorKind::InvalidInput, message),
        )
    }
}

/// CRC32C (Castagnoli) of `bytes`, masked as TFRecord wants: a CRC stored next to data that
/// itself holds CRCs is otherwise easy to confuse with them.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Opens a file of the documented name that did not exist before. Two writers of one process
/// in one second (tests, a quick restart) would share the name, so later ones get a counter.
fn create_new_file(dir: &Path, secs: u64, host: &str, pid: u32) -> Result<(PathBuf, File)> {
    let mut attempt = 0u32;
    loop {
        let suffix = if attempt == 0 {
            String::new()
        } else {
            format!(".{attempt}")
        };
        let path = dir.join(format!("events.out.tfevents.{secs}.{host}.{pid}{suffix}.forger"));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists && attempt < 1000 => attempt += 1,
            Err(e) => return Err(CoordinatorError::io(format!("failed to create {}", path.display()), e)),
        }
    }
}

/// The machine's name for the file name, kept to characters safe in any file name.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let safe: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if safe.is_empty() { "localhost".into() } else { safe }
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The facts of a PNG's IHDR chunk that the image summary needs.
#[derive(Debug, PartialEq, Eq)]
struct PngHeader {
    width: u32,
    height: u32,
    colorspace: i32,
}

impl PngHeader {
    /// Reads the signature and the IHDR chunk, which PNG requires to come first.
    fn parse(png: &[u8]) -> std::result::Result<PngHeader, String> {
        const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
        // Signature, chunk length, "IHDR", width, height, bit depth, colour type.
        if png.len() < 26 || png[..8] != SIGNATURE || &png[12..16] != b"IHDR" {
            return Err(format!("{} bytes that do not start like a PNG file", png.len()));
        }
        let word = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
        let colorspace = match png[25] {
            0 => COLORSPACE_GREY,
            4 => COLORSPACE_GREY_ALPHA,
            // A palette image decodes to RGB (RGBA only with a transparency chunk, which a
            // viewer handles by itself; the field is a hint).
            2 | 3 => COLORSPACE_RGB,
            6 => COLORSPACE_RGBA,
            other => return Err(format!("a PNG of unknown colour type {other}")),
        };
        Ok(PngHeader {
            width: word(16),
            height: word(20),
            colorspace,
        })
    }
}

#[cfg(test)]
mod tests;
