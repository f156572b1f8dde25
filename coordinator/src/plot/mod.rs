//! The training plot written beside every checkpoint, so a finished run can be judged at a
//! glance: the two losses against the step (binned per pixel column, a faint band for each
//! column's range, a strip marking the steps where balancing rested D or G), and below them
//! the sliced Wasserstein distance measured at the checkpoints.
//!
//! Drawn with plotters into a plain RGB buffer, text with ab_glyph from a font compiled in
//! (`text`), so nothing is read from the system at run time.
//!
//! - `bins`: per-column means, ranges and skip shares.
//! - `axis`: ranges, tick spacing and label formats.
//! - `chart`: the frame both panels share, so their step axes line up.
//! - `losses`, `scores`: the two panels; `text`: the font and its layout.

mod axis;
mod bins;
mod chart;
mod losses;
mod scores;
#[cfg(test)]
mod tests;
mod text;

use std::ops::Range;
use std::path::Path;

use image::RgbImage;
use plotters::prelude::*;

use crate::error::{CoordinatorError, Result};

/// The losses of one step, as the metrics log holds them (a null loss reads as NaN).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossPoint {
    pub step: u64,
    pub loss_d: f64,
    pub loss_g: f64,
    /// Whether D was updated in this step (false: balancing let it sit the step out).
    pub train_d: bool,
    /// Whether G was updated in this step.
    pub train_g: bool,
}

/// The sample-quality score measured at a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScorePoint {
    pub step: u64,
    /// Sliced Wasserstein distance between generated and real faces; lower is better.
    pub swd: f64,
}

/// Size of the plot in pixels.
pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 860;

/// The title line across the top.
const HEADER_HEIGHT: u32 = 48;
/// The loss panel, its skip strip included; the score panel takes the rest.
const LOSS_PANEL_HEIGHT: u32 = 500;

const TEXT: RGBColor = RGBColor(34, 34, 34);
const MUTED: RGBColor = RGBColor(105, 105, 105);
const D_COLOR: RGBColor = RGBColor(31, 119, 180);
const G_COLOR: RGBColor = RGBColor(230, 110, 20);
const SWD_COLOR: RGBColor = RGBColor(40, 150, 60);

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// The score panel's note for a run that scores but has no score yet.
pub const SCORES_TO_COME: &str = "no SWD scores yet: one is measured at each checkpoint";
/// The score panel's note for a run that holds no images out, so never scores.
pub const NOT_SCORED: &str = "no SWD score: this run holds no images out ([quality] held_out, or a small dataset)";

/// Draws the plot. Any input is drawn, none or one point included; non-finite values are
/// left out.
pub fn render_training_plot(losses: &[LossPoint], scores: &[ScorePoint], title: &str) -> Result<RgbImage> {
    render_training_plot_noting(losses, scores, title, SCORES_TO_COME)
}

/// [`render_training_plot`], with `no_scores` shown in the score panel while there are none.
pub fn render_training_plot_noting(
    losses: &[LossPoint],
    scores: &[ScorePoint],
    title: &str,
    no_scores: &str,
) -> Result<RgbImage> {
    let mut buffer = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let (header, body) = root.split_vertically(HEADER_HEIGHT);
        let (top, bottom) = body.split_vertically(LOSS_PANEL_HEIGHT);
        let steps = step_range(losses, scores);
        draw_header(&header, title, steps.as_ref())?;
        let x = match &steps {
            Some((first, last)) => axis::step_range(*first, *last),
            None => axis::step_range(0, 0),
        };
        losses::draw(&top, losses, &x)?;
        scores::draw(&bottom, scores, &x, no_scores)?;
        root.present().map_err(drawing)?;
    }
    RgbImage::from_raw(WIDTH, HEIGHT, buffer)
        .ok_or_else(|| CoordinatorError::Plot("the pixel buffer does not match the plot size".to_string()))
}

/// Draws the plot ([`render_training_plot_noting`]) and writes it as a PNG, atomically (a
/// reader never sees half a file).
pub fn save_training_plot(
    path: &Path,
    losses: &[LossPoint],
    scores: &[ScorePoint],
    title: &str,
    no_scores: &str,
) -> Result<()> {
    let image = render_training_plot_noting(losses, scores, title, no_scores)?;
    forger_common::grid::save_png(path, &image)?;
    Ok(())
}

/// The first and last step of either series.
fn step_range(losses: &[LossPoint], scores: &[ScorePoint]) -> Option<(u64, u64)> {
    let steps = losses.iter().map(|p| p.step).chain(scores.iter().map(|p| p.step));
    steps.fold(None, |range, step| match range {
        None => Some((step, step)),
        Some((first, last)) => Some((first.min(step), last.max(step))),
    })
}

fn draw_header(area: &Area<'_>, title: &str, steps: Option<&(u64, u64)>) -> Result<()> {
    let (width, height) = area.dim_in_pixel();
    let middle = height as i32 / 2 + 2;
    // A title too long for the line would run into the step note.
    let title: String = title.chars().take(80).collect();
    let title_style = text::Style::bold(18.0, TEXT);
    text::draw(
        area,
        &title,
        (chart::MARGIN_LEFT as i32 + 4, middle),
        text::Align::Start,
        &title_style,
        true,
    )?;
    let note = match steps {
        Some((first, last)) if first == last => format!("step {}", crate::format::thousands(*last)),
        Some((first, last)) => format!(
            "steps {} to {}",
            crate::format::thousands(*first),
            crate::format::thousands(*last)
        ),
        None => "no steps yet".to_string(),
    };
    let x = (width - chart::MARGIN_RIGHT) as i32;
    text::draw(
        area,
        &note,
        (x, middle),
        text::Align::End,
        &text::Style::regular(13.0, MUTED),
        true,
    )
}

/// plotters' errors carry the backend's; the plot only reports them.
fn drawing(error: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Plot(format!("drawing failed: {error}"))
}

/// The range of finite values in `values`, if any.
fn finite_extent(values: impl Iterator<Item = f64>) -> Option<Range<f64>> {
    values.filter(|v| v.is_finite()).fold(None, |extent, v| match extent {
        None => Some(v..v),
        Some(r) => Some(r.start.min(v)..r.end.max(v)),
    })
}
