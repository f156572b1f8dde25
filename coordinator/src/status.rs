//! The status page: what a person watching a run wants to see, served read-only over plain
//! HTTP beside the gRPC port, as an HTML page, as JSON, and in the terminal.
//!
//! - [`StatusBoard`] (`board`): the shared state the trainer updates after each step; cheap
//!   (a std mutex around plain data, O(1) amortised updates). Its [`StatusSnapshot`] is what
//!   `/status.json` returns.
//! - `rates`: steps/s and images/s over a recent window; `history`: the loss curves,
//!   downsampled so they stay at most [`MAX_HISTORY_POINTS`] points however long the run.
//! - [`serve_status`] (`server`): the HTTP server: `/`, `/status.json`, `/samples/latest.png`.
//! - `page.html`: the page itself, plain HTML, CSS and JS with no external resources.
//! - [`client`]: `forger-coordinator status URL`: fetches the JSON and renders it as text.

mod board;
pub mod client;
mod history;
mod nullable;
mod rates;
mod server;
mod snapshot;

pub use board::{JobInfo, StatusBoard, StepPoint, WorkerRow};
pub use history::MAX_HISTORY_POINTS;
pub use server::serve_status;
pub use snapshot::{LatestStep, LossCurves, QualityPoint, StatusSnapshot};

#[cfg(test)]
mod tests;
