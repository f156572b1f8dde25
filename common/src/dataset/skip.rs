//! Why a file of the dataset folder was passed over, and the report of all of them: one
//! summary line for the log and a file with every path and reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The kinds of reason, for the summary line; the detail says more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipKind {
    /// Zero bytes.
    Empty,
    /// No known image format (a text file, a video).
    NotAnImage,
    /// A known format that does not decode: truncated, corrupt, or a variant the decoder lacks.
    Damaged,
    /// Fewer pixels than training needs (see `decode::MIN_SIDE_FRACTION`).
    TooSmall,
    /// Over the decoding limits: a huge image or a decompression bomb.
    TooLarge,
    /// Cannot be opened or read (permissions, a broken link, an I/O error).
    Unreadable,
    /// A device, FIFO or socket.
    NotAFile,
    /// A folder reached a second time through a link (a loop, or two links to one folder).
    SeenFolder,
}

impl SkipKind {
    pub fn label(self) -> &'static str {
        match self {
            SkipKind::Empty => "empty",
            SkipKind::NotAnImage => "not an image",
            SkipKind::Damaged => "damaged",
            SkipKind::TooSmall => "too small",
            SkipKind::TooLarge => "over the size limit",
            SkipKind::Unreadable => "unreadable",
            SkipKind::NotAFile => "not a regular file",
            SkipKind::SeenFolder => "folder already read",
        }
    }
}

/// One file passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub file: PathBuf,
    pub kind: SkipKind,
    /// What exactly, in words (the decoder's error, the size found).
    pub reason: String,
}

impl Skipped {
    pub fn new(file: impl Into<PathBuf>, kind: SkipKind, reason: impl Into<String>) -> Skipped {
        Skipped {
            file: file.into(),
            kind,
            reason: reason.into(),
        }
    }
}

/// "12 skipped: 7 damaged, 3 not an image, 2 too small", or `None` when nothing was.
pub fn summary(skipped: &[Skipped]) -> Option<String> {
    if skipped.is_empty() {
        return None;
    }
    let mut counts: BTreeMap<SkipKind, usize> = BTreeMap::new();
    for s in skipped {
        *counts.entry(s.kind).or_default() += 1;
    }
    let mut counts: Vec<(SkipKind, usize)> = counts.into_iter().collect();
    // Most frequent first; ties in the enum's order, so the line is stable.
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let parts: Vec<String> = counts.iter().map(|(kind, n)| format!("{n} {}", kind.label())).collect();
    Some(format!("{} skipped: {}", skipped.len(), parts.join(", ")))
}

/// The report file: a header, then one tab-separated line per file (path, kind, reason).
/// Tabs and line breaks inside a field become spaces, so every line parses.
pub fn report(skipped: &[Skipped]) -> String {
    let clean = |text: &str| text.replace(['\t', '\n', '\r'], " ");
    let mut out = String::from("file\tkind\treason\n");
    for s in skipped {
        out.push_str(&format!(
            "{}\t{}\t{}\n",
            clean(&s.file.display().to_string()),
            s.kind.label(),
            clean(&s.reason)
        ));
    }
    out
}

/// The file a dataset report goes to in a run directory.
pub fn report_path(run_dir: &Path) -> PathBuf {
    run_dir.join("skipped-images.tsv")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_each_kind_most_frequent_first() {
        let skipped = vec![
            Skipped::new("a", SkipKind::TooSmall, "3x3"),
            Skipped::new("b", SkipKind::Damaged, "truncated"),
            Skipped::new("c", SkipKind::Damaged, "bad huffman"),
            Skipped::new("d", SkipKind::Empty, ""),
        ];
        assert_eq!(summary(&skipped).unwrap(), "4 skipped: 2 damaged, 1 empty, 1 too small");
        assert_eq!(summary(&[]), None);
    }

    #[test]
    fn the_report_has_one_parsable_line_per_file() {
        let skipped = vec![Skipped::new("odd\tname.jpg", SkipKind::Damaged, "line\nbreak")];
        let text = report(&skipped);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, ["file\tkind\treason", "odd name.jpg\tdamaged\tline break"]);
    }
}
