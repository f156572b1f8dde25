//! The data connection: gradients and parameters as length-prefixed frames on plain TCP,
//! beside the gRPC Session (the protocol file describes the exchange).
//!
//! gRPC copies a message's bytes into an encode buffer, the HTTP/2 frames and a decode buffer
//! on their way; a frame here goes from the sender's buffer to the kernel and from the kernel
//! into the receiver's buffer, which is reused from frame to frame.

use bytes::{Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::connection::Connection;
use crate::pb;
use crate::tls::ClientSecurity;

/// The first bytes of a data connection; a gRPC connection starts with HTTP/2's "PRI * HT".
pub const DATA_MAGIC: [u8; 8] = *b"FORGERDP";

/// The largest frame header: a chunk's metadata with a network's batch-norm statistics, a few
/// KiB for any model that fits in memory.
pub const MAX_HEADER_BYTES: usize = 1 << 20;
/// The largest hello or welcome: they hold an id, a 32-byte token and at most a sentence. Read
/// before the peer is known, so kept small: a stranger must not make the coordinator reserve
/// a megabyte per connection.
pub const MAX_HANDSHAKE_BYTES: usize = 4 << 10;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the connection closed in the middle of a frame")]
    Truncated,
    #[error("a frame's {part} of {len} bytes is over the limit of {max}")]
    TooLarge { part: &'static str, len: usize, max: usize },
    #[error("a frame's header does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("the connection does not start as a forger data connection")]
    NoMagic,
    #[error("the coordinator refused the data connection: {0}")]
    Refused(String),
}

/// Writes one frame: `header`, then `payload` as it is.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    header: &impl Message,
    payload: &[u8],
) -> Result<(), FrameError> {
    let header_len = header.encoded_len();
    let mut head = Vec::with_capacity(8 + header_len);
    head.extend_from_slice(&(header_len as u32).to_le_bytes());
    head.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    header.encode(&mut head).expect("a Vec grows to fit");
    writer.write_all(&head).await?;
    writer.write_all(payload).await?;
    // TLS may keep the frame's last record until it is flushed (a no-op on plain TCP): the
    // peer must not wait for a frame that sits in this process.
    writer.flush().await?;
    Ok(())
}

/// Reads frames whose payload is at most `max_payload` bytes, into buffers reused from frame
/// to frame once the receiver has let go of the previous payloads.
#[derive(Debug)]
pub struct FrameReader<R> {
    reader: R,
    header: Vec<u8>,
    payload: BytesMut,
    max_header: usize,
    max_payload: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R, max_payload: usize) -> Self {
        FrameReader {
            reader,
            header: Vec::new(),
            payload: BytesMut::new(),
            max_header: MAX_HEADER_BYTES,
            max_payload,
        }
    }

    /// A reader for the handshake: headers of at most [`MAX_HANDSHAKE_BYTES`], no payload.
    pub fn handshake(reader: R) -> Self {
        FrameReader {
            max_header: MAX_HANDSHAKE_BYTES,
            ..FrameReader::new(reader, 0)
        }
    }

    /// The next frame, or `None` when the connection closed between frames.
    pub async fn read<M: Message + Default>(&mut self) -> Result<Option<(M, Bytes)>, FrameError> {
        let mut lengths = [0u8; 8];
        let mut filled = 0;
        while filled < lengths.len() {
            match self.reader.read(&mut lengths[filled..]).await {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => return Err(FrameError::Truncated),
                Ok(n) => filled += n,
                // TLS without its close_notify between frames: the peer went away, as a plain
                // TCP close would say; the framing already catches a cut inside a frame.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && filled == 0 => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        let header_len = u32::from_le_bytes(lengths[..4].try_into().expect("4 bytes")) as usize;
        let payload_len = u32::from_le_bytes(lengths[4..].try_into().expect("4 bytes")) as usize;
        check_size("header", header_len, self.max_header)?;
        check_size("payload", payload_len, self.max_payload)?;
        self.header.resize(header_len, 0);
        self.reader.read_exact(&mut self.header).await.map_err(truncated)?;
        let header = M::decode(self.header.as_slice())?;
        // `reserve` takes the old allocation back when every earlier payload has been dropped,
        // and reading into spare capacity skips zeroing it first.
        self.payload.reserve(payload_len);
        let mut limited = (&mut self.reader).take(payload_len as u64);
        while self.payload.len() < payload_len {
            if limited.read_buf(&mut self.payload).await? == 0 {
                return Err(FrameError::Truncated);
            }
        }
        Ok(Some((header, self.payload.split().freeze())))
    }

    /// Reads the 8 bytes a data connection opens with and checks them.
    pub async fn read_magic(&mut self) -> Result<(), FrameError> {
        let mut magic = [0u8; 8];
        self.reader.read_exact(&mut magic).await.map_err(truncated)?;
        if magic != DATA_MAGIC {
            return Err(FrameError::NoMagic);
        }
        Ok(())
    }

    pub fn into_inner(self) -> R {
        self.reader
    }
}

fn check_size(part: &'static str, len: usize, max: usize) -> Result<(), FrameError> {
    if len > max {
        return Err(FrameError::TooLarge { part, len, max });
    }
    Ok(())
}

fn truncated(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Truncated
    } else {
        FrameError::Io(e)
    }
}

/// Opens a worker's data connection to `address` (`host:port`, the coordinator's gRPC
/// address; `host` is the name its certificate must carry) and introduces it with `hello`. Returns the connection once the coordinator has
/// accepted it.
pub async fn connect(
    address: &str,
    host: &str,
    security: &ClientSecurity,
    hello: &pb::DataHello,
) -> Result<Connection, FrameError> {
    let stream = TcpStream::connect(address).await?;
    // Without this the last small frame of a phase waits for the peer's delayed ACK.
    stream.set_nodelay(true)?;
    let mut stream = security.wrap_data(stream, host).await?;
    stream.write_all(&DATA_MAGIC).await?;
    write_frame(&mut stream, hello, &[]).await?;
    let mut reader = FrameReader::handshake(&mut stream);
    let welcome = reader.read::<pb::DataWelcome>().await?;
    match welcome {
        None => Err(FrameError::Truncated),
        Some((welcome, _)) if !welcome.refusal.is_empty() => Err(FrameError::Refused(welcome.refusal)),
        Some(_) => Ok(stream),
    }
}

/// A frame header whose `values` travel as the frame's payload.
pub trait Chunk: Message + Default + Send + 'static {
    fn take_values(&mut self) -> Bytes;
    fn set_values(&mut self, values: Bytes);
}

impl Chunk for pb::GradientChunk {
    fn take_values(&mut self) -> Bytes {
        std::mem::take(&mut self.values)
    }
    fn set_values(&mut self, values: Bytes) {
        self.values = values;
    }
}

impl Chunk for pb::ParamsChunk {
    fn take_values(&mut self) -> Bytes {
        std::mem::take(&mut self.values)
    }
    fn set_values(&mut self, values: Bytes) {
        self.values = values;
    }
}

/// Chunks queued in each direction before the sender waits.
const LINK_QUEUE: usize = 64;

/// A data connection driven by two tasks: chunks put in `send` go out as frames, frames that
/// arrive come out of `received` (an error ends it, as does the peer closing the connection).
/// Dropping the link closes the connection.
#[derive(Debug)]
pub struct FrameLink<Out, In> {
    pub send: mpsc::Sender<Out>,
    pub received: mpsc::Receiver<Result<In, FrameError>>,
    reader: JoinHandle<()>,
}

impl<Out, In> Drop for FrameLink<Out, In> {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl<Out: Chunk, In: Chunk> FrameLink<Out, In> {
    /// Starts the tasks on `stream`; incoming payloads above `max_payload` bytes are an error.
    pub fn spawn(stream: Connection, max_payload: usize) -> Self {
        let (read, mut write) = tokio::io::split(stream);
        let (send, mut queue) = mpsc::channel::<Out>(LINK_QUEUE);
        let (arrived, received) = mpsc::channel(LINK_QUEUE);
        tokio::spawn(async move {
            while let Some(mut chunk) = queue.recv().await {
                let values = chunk.take_values();
                // A failed write shows on the reading side too, which reports it.
                if write_frame(&mut write, &chunk, &values).await.is_err() {
                    return;
                }
            }
            // Over TLS this says goodbye properly (close_notify).
            let _ = write.shutdown().await;
        });
        let reader = tokio::spawn(async move {
            let mut frames = FrameReader::new(read, max_payload);
            loop {
                let frame = match frames.read::<In>().await {
                    Ok(Some((mut chunk, values))) => {
                        chunk.set_values(values);
                        Ok(chunk)
                    }
                    Ok(None) => return,
                    Err(e) => Err(e),
                };
                let failed = frame.is_err();
                if arrived.send(frame).await.is_err() || failed {
                    return;
                }
            }
        });
        FrameLink { send, received, reader }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64) -> pb::GradientChunk {
        pb::GradientChunk {
            step: 7,
            offset,
            last: true,
            bn_batch_stats: vec![1.5, 2.5],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_the_reader_ends_between_frames() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let payloads: Vec<Vec<u8>> = vec![(0..=255).collect(), Vec::new(), vec![9; 100_000]];
        let sent = payloads.clone();
        let writer = tokio::spawn(async move {
            for (i, payload) in sent.iter().enumerate() {
                write_frame(&mut a, &chunk(i as u64), payload).await.unwrap();
            }
        });
        let mut reader = FrameReader::new(b, 100_000);
        for (i, payload) in payloads.iter().enumerate() {
            let (header, bytes) = reader.read::<pb::GradientChunk>().await.unwrap().unwrap();
            assert_eq!(header, chunk(i as u64));
            assert_eq!(&bytes[..], &payload[..]);
        }
        writer.await.unwrap();
        assert!(reader.read::<pb::GradientChunk>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_payload_over_the_limit_is_refused_before_it_is_read() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        write_frame(&mut a, &chunk(0), &[0; 1001]).await.unwrap();
        let error = FrameReader::new(b, 1000).read::<pb::GradientChunk>().await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "a frame's payload of 1001 bytes is over the limit of 1000"
        );
    }

    #[tokio::test]
    async fn a_huge_header_length_is_refused() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        a.write_all(&0u32.to_le_bytes()).await.unwrap();
        let error = FrameReader::new(b, 1000).read::<pb::GradientChunk>().await.unwrap_err();
        assert!(matches!(error, FrameError::TooLarge { part: "header", .. }), "{error}");
    }

    #[tokio::test]
    async fn a_handshake_header_over_a_few_kib_is_refused_before_anything_is_reserved() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&((MAX_HANDSHAKE_BYTES + 1) as u32).to_le_bytes())
            .await
            .unwrap();
        a.write_all(&0u32.to_le_bytes()).await.unwrap();
        let mut reader = FrameReader::handshake(b);
        let error = reader.read::<pb::DataHello>().await.unwrap_err();
        assert!(matches!(error, FrameError::TooLarge { part: "header", .. }), "{error}");
        assert_eq!(reader.header.capacity(), 0);
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_an_error_not_an_end() {
        for cut in [3, 8, 12, 30] {
            let (mut a, b) = tokio::io::duplex(1 << 16);
            let mut whole = Vec::new();
            write_frame(&mut whole, &chunk(0), &[5; 20]).await.unwrap();
            a.write_all(&whole[..cut]).await.unwrap();
            drop(a);
            let error = FrameReader::new(b, 1000).read::<pb::GradientChunk>().await.unwrap_err();
            assert!(matches!(error, FrameError::Truncated), "cut at {cut}: {error}");
        }
    }

    #[tokio::test]
    async fn a_header_that_is_not_protobuf_is_a_decode_error() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&3u32.to_le_bytes()).await.unwrap();
        a.write_all(&0u32.to_le_bytes()).await.unwrap();
        a.write_all(&[0xff, 0xff, 0xff]).await.unwrap();
        let error = FrameReader::new(b, 1000).read::<pb::GradientChunk>().await.unwrap_err();
        assert!(matches!(error, FrameError::Decode(_)), "{error}");
    }
}
