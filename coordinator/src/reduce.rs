//! The all-reduce's first half: assembling each shard's upload from its chunks (the averaging
//! is `forger_common::average`).

use forger_common::wire;

/// One shard's upload for a phase, assembled from its chunks.
#[derive(Debug)]
pub struct Upload {
    values: Vec<f32>,
    received: usize,
    pub samples: u32,
    pub bn_stats: Vec<f32>,
    pub complete: bool,
}

/// Why a chunk was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkError {
    OutOfOrder { expected: usize, found: usize },
    TooLong { len: usize },
    Misaligned,
    EndedEarly { received: usize, len: usize },
    AfterEnd,
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChunkError::OutOfOrder { expected, found } => {
                write!(f, "chunk starts at element {found}, expected {expected}")
            }
            ChunkError::TooLong { len } => write!(f, "gradient is longer than the {len} parameters"),
            ChunkError::Misaligned => write!(f, "chunk is not a whole number of f32 values"),
            ChunkError::EndedEarly { received, len } => {
                write!(f, "upload ended after {received} of {len} values")
            }
            ChunkError::AfterEnd => write!(f, "chunk after the final one"),
        }
    }
}

impl Upload {
    pub fn new(len: usize) -> Self {
        Upload {
            values: vec![0.0; len],
            received: 0,
            samples: 0,
            bn_stats: Vec::new(),
            complete: false,
        }
    }

    /// Clears the upload for the next phase, keeping its buffer.
    pub fn reset(&mut self) {
        self.received = 0;
        self.samples = 0;
        self.bn_stats.clear();
        self.complete = false;
    }

    /// Takes one chunk. Chunks must arrive in order and cover the buffer exactly.
    pub fn accept(&mut self, offset: usize, bytes: &[u8], last: bool) -> Result<(), ChunkError> {
        if self.complete {
            return Err(ChunkError::AfterEnd);
        }
        if offset != self.received {
            return Err(ChunkError::OutOfOrder {
                expected: self.received,
                found: offset,
            });
        }
        if !bytes.len().is_multiple_of(4) {
            return Err(ChunkError::Misaligned);
        }
        let count = bytes.len() / 4;
        if offset + count > self.values.len() {
            return Err(ChunkError::TooLong { len: self.values.len() });
        }
        wire::le_bytes_to_f32(bytes, &mut self.values[offset..offset + count]);
        self.received += count;
        if last {
            if self.received != self.values.len() {
                return Err(ChunkError::EndedEarly {
                    received: self.received,
                    len: self.values.len(),
                });
            }
            self.complete = true;
        }
        Ok(())
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Whether every value and batch-norm statistic is finite: one NaN or infinity would
    /// spread through the average into every parameter.
    pub fn is_finite(&self) -> bool {
        self.values.iter().chain(&self.bn_stats).all(|v| v.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        wire::f32_to_le_bytes(values, &mut out);
        out
    }

    #[test]
    fn assembles_chunks_in_order() {
        let mut upload = Upload::new(4);
        upload.accept(0, &bytes(&[1.0, 2.0]), false).unwrap();
        upload.accept(2, &bytes(&[3.0, 4.0]), true).unwrap();
        assert!(upload.complete);
        assert_eq!(upload.values(), &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(upload.accept(4, &[], true), Err(ChunkError::AfterEnd));
    }

    #[test]
    fn refuses_gaps_overruns_and_short_uploads() {
        let mut upload = Upload::new(4);
        assert_eq!(
            upload.accept(1, &bytes(&[1.0]), false),
            Err(ChunkError::OutOfOrder { expected: 0, found: 1 })
        );
        assert_eq!(
            upload.accept(0, &bytes(&[0.0; 5]), true),
            Err(ChunkError::TooLong { len: 4 })
        );
        assert_eq!(upload.accept(0, &[0, 0, 0], false), Err(ChunkError::Misaligned));
        assert_eq!(
            upload.accept(0, &bytes(&[1.0]), true),
            Err(ChunkError::EndedEarly { received: 1, len: 4 })
        );
    }
}
