//! The forger wire protocol, generated from `proto/forger/v1/forger.proto`.
//!
//! The messages live under [`pb`]; other crates convert these types to their own at the edge.
//! [`data`] frames the data connection that carries gradients and parameters beside the
//! Session, and [`order`] merges the two back into the coordinator's send order. [`tls`] and
//! [`token`] secure both connections; [`connection`] is the stream type they travel on.
//! [`tensorboard`] holds the few TensorBoard event messages the coordinator's event log writes.

pub mod connection;
pub mod data;
pub mod order;
pub mod tls;
pub mod token;

/// Bumped whenever a message changes meaning; a worker of another version is refused at Join.
pub const PROTOCOL_VERSION: u32 = 4;

/// Generated protobuf types and tonic service stubs for `forger.v1`.
#[allow(missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("forger.v1");
}

/// The subset of TensorBoard's `Event` and `Summary` that forger writes (scalars and PNG
/// images), wire-compatible with TensorBoard's own; generated from
/// `proto/tensorboard/event.proto`.
#[allow(missing_debug_implementations, clippy::all)]
pub mod tensorboard {
    tonic::include_proto!("forger.tensorboard");
}

impl pb::CoordinatorMessage {
    /// A message of `kind`, its `data_frames_before` still 0: the coordinator stamps it as it
    /// sends it, since only then is the count known.
    pub fn of(kind: pb::coordinator_message::Kind) -> Self {
        pb::CoordinatorMessage {
            data_frames_before: 0,
            kind: Some(kind),
        }
    }
}
