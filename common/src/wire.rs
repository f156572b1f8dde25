//! f32 buffers travel as little-endian bytes.

/// f32 values per parameter or gradient chunk on the wire: 1 MiB of payload, well under
/// gRPC's default 4 MiB message limit.
pub const CHUNK_VALUES: usize = 1 << 18;

/// HTTP/2 flow-control windows of the session stream and its connection, in bytes. h2's
/// default of 64 KiB makes a 17 MB gradient wait for a window update every 64 KiB; a window
/// above one step's traffic per worker lets a phase's chunks flow without stopping.
pub const STREAM_WINDOW: u32 = 32 << 20;
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// The largest HTTP/2 frame a peer may send (the protocol allows up to 16 MiB - 1): a
/// 1 MiB chunk then takes one frame instead of 64 of the default 16 KiB.
pub const MAX_FRAME: u32 = (1 << 20) - 1;

// The wire format is the memory layout of f32 on little-endian machines, so a buffer goes
// on and off the wire with one copy.
#[cfg(not(target_endian = "little"))]
compile_error!("forger's wire format copies f32 memory as little-endian bytes");

/// Appends `values` to `out` as little-endian bytes.
pub fn f32_to_le_bytes(values: &[f32], out: &mut Vec<u8>) {
    out.extend_from_slice(bytemuck::cast_slice(values));
}

/// `values` as little-endian bytes in one new buffer, to slice into chunks without copying.
pub fn f32_bytes(values: &[f32]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(bytemuck::cast_slice(values))
}

/// `values` as little-endian bytes without copying them: the buffer becomes the bytes' owner.
pub fn f32_bytes_owned(values: Vec<f32>) -> bytes::Bytes {
    bytes::Bytes::from_owner(F32Bytes(values))
}

/// A `Vec<f32>` seen as its bytes (f32 memory is the wire format, see above).
struct F32Bytes(Vec<f32>);

impl AsRef<[u8]> for F32Bytes {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// Decodes little-endian bytes into `out`, which must hold exactly `bytes.len() / 4` values.
/// Returns `false` when the lengths do not fit.
pub fn le_bytes_to_f32(bytes: &[u8], out: &mut [f32]) -> bool {
    if bytes.len() != out.len() * 4 {
        return false;
    }
    // The received bytes need not be 4-aligned, so copy as bytes.
    bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(bytes);
    true
}

/// CRC32 of a buffer's little-endian bytes: the replica check compares these.
pub fn crc32_of(buffers: &[&[f32]]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    for buffer in buffers {
        hasher.update(bytemuck::cast_slice(buffer));
    }
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let values = [0.0f32, -1.5, f32::MAX, 1e-30];
        let mut bytes = Vec::new();
        f32_to_le_bytes(&values, &mut bytes);
        let mut back = [0f32; 4];
        assert!(le_bytes_to_f32(&bytes, &mut back));
        assert_eq!(values, back);
        assert!(!le_bytes_to_f32(&bytes[..15], &mut back));
        assert_eq!(&f32_bytes_owned(values.to_vec())[..], &bytes[..]);
        assert_eq!(f32_bytes(&values), f32_bytes_owned(values.to_vec()));
    }

    #[test]
    fn crc_depends_on_every_value() {
        let a = crc32_of(&[&[1.0, 2.0], &[3.0]]);
        let b = crc32_of(&[&[1.0, 2.0], &[3.0000002]]);
        assert_ne!(a, b);
        assert_eq!(a, crc32_of(&[&[1.0], &[2.0, 3.0]]));
    }
}
