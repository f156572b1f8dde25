//! The loss panel: loss D and loss G against the step, one mean per pixel column with a faint
//! band from the column's lowest to its highest value, and above it a strip marking where
//! balancing let D or G sit steps out.

use std::ops::Range;

use plotters::prelude::*;

use super::bins::{self, Bin, Columns};
use super::text::{self, Align, Style};
use super::{Area, D_COLOR, G_COLOR, LossPoint, MUTED, axis, chart, drawing, finite_extent};
use crate::error::Result;

/// The skip strip above the chart: two rows, D's and G's.
pub(super) const STRIP_HEIGHT: u32 = 30;
const ROW_HEIGHT: i32 = 8;
const ROW_BACKGROUND: RGBColor = RGBColor(240, 240, 240);
/// How opaque the min-max band is: enough to see, faint enough that both lines stay readable
/// where the bands overlap.
const BAND_ALPHA: f64 = 0.16;
/// The key's band swatch stands for both series' bands.
const BAND_SWATCH: RGBColor = RGBColor(110, 110, 110);

struct Series<'a> {
    name: &'a str,
    color: RGBColor,
    runs: Vec<Vec<Bin>>,
    /// The last finite value logged.
    last: Option<f64>,
    skipped: usize,
}

pub(super) fn draw(area: &Area<'_>, losses: &[LossPoint], x: &Range<f64>) -> Result<()> {
    let (strip, panel) = area.split_vertically(STRIP_HEIGHT);
    let columns = Columns::new(x, chart::plot_columns(panel.dim_in_pixel().0));
    let series = [
        Series {
            name: "loss D",
            color: D_COLOR,
            runs: bins::bin_series(losses.iter().map(|p| (p.step, p.loss_d)), &columns),
            last: last_finite(losses, |p| p.loss_d),
            skipped: losses.iter().filter(|p| !p.train_d).count(),
        },
        Series {
            name: "loss G",
            color: G_COLOR,
            runs: bins::bin_series(losses.iter().map(|p| (p.step, p.loss_g)), &columns),
            last: last_finite(losses, |p| p.loss_g),
            skipped: losses.iter().filter(|p| !p.train_g).count(),
        },
    ];
    let means = series.iter().flat_map(|s| s.runs.iter().flatten().map(|b| b.mean));
    let Some(extent) = finite_extent(means) else {
        let message = if losses.is_empty() {
            "no steps recorded yet"
        } else {
            "no finite losses recorded yet"
        };
        return chart::draw_note(&panel, message);
    };
    let (key, panel) = panel.split_vertically(chart::KEY_HEIGHT);
    // The axis follows the means; a band reaching past it is cut at the frame.
    let y = axis::padded(extent.start, extent.end, 0.06);
    let chart = chart::build(&panel, x, &y, "loss")?;

    let clamp = |v: f64| v.clamp(y.start, y.end);
    for s in &series {
        let bands = s
            .runs
            .iter()
            .filter(|run| run.len() > 1 && run.iter().any(|b| b.count > 1));
        let fill = s.color.mix(BAND_ALPHA).filled();
        for run in bands {
            let upper = run.iter().map(|b| (b.step, clamp(b.max)));
            let lower = run.iter().rev().map(|b| (b.step, clamp(b.min)));
            chart
                .plotting_area()
                .draw(&Polygon::new(upper.chain(lower).collect::<Vec<_>>(), fill))
                .map_err(drawing)?;
        }
    }
    for s in &series {
        for run in &s.runs {
            // A run of one column (a single step, or one between gaps) has no line to draw.
            if let [only] = run.as_slice() {
                chart
                    .plotting_area()
                    .draw(&Circle::new((only.step, only.mean), 4, s.color.filled()))
                    .map_err(drawing)?;
            } else {
                let points = run.iter().map(|b| (b.step, b.mean)).collect::<Vec<_>>();
                chart::thick_line(&chart, &points, s.color)?;
            }
        }
    }

    let mut items: Vec<chart::KeyItem> = series
        .iter()
        .map(|s| {
            let mut label = s.name.to_string();
            if let Some(last) = s.last {
                label += &format!(": last {}", axis::format_significant(last));
            }
            match s.skipped {
                0 => {}
                1 => label += ", sat out 1 step",
                n => label += &format!(", sat out {} steps", crate::format::thousands(n as u64)),
            }
            chart::KeyItem {
                swatch: chart::Swatch::Line(s.color),
                label,
            }
        })
        .collect();
    if series.iter().flat_map(|s| s.runs.iter().flatten()).any(|b| b.count > 1) {
        items.push(chart::KeyItem {
            swatch: chart::Swatch::Band(BAND_SWATCH, BAND_ALPHA * 2.0),
            label: "min to max in each pixel column".to_string(),
        });
    }
    chart::draw_key(&key, &items)?;

    let (px, _) = chart.plotting_area().get_pixel_range();
    draw_skip_strip(&strip, px, losses, x)
}

/// Two thin rows over the chart's columns, D's above G's: a column is tinted by the share of
/// its steps in which that network sat out (full colour: every step).
fn draw_skip_strip(strip: &Area<'_>, columns_px: Range<i32>, losses: &[LossPoint], x: &Range<f64>) -> Result<()> {
    let base = strip.get_base_pixel();
    let left = columns_px.start - base.0;
    let columns = Columns::new(x, columns_px.len());
    let rows = [
        (
            "D sat out",
            D_COLOR,
            bins::skip_shares(losses, |p| p.step, |p| !p.train_d, &columns),
        ),
        (
            "G sat out",
            G_COLOR,
            bins::skip_shares(losses, |p| p.step, |p| !p.train_g, &columns),
        ),
    ];
    let label_style = Style::regular(10.5, MUTED);
    for (row, (label, color, shares)) in rows.iter().enumerate() {
        let top = 6 + row as i32 * (ROW_HEIGHT + 4);
        let bottom = top + ROW_HEIGHT;
        text::draw(
            strip,
            label,
            (left - 8, top + ROW_HEIGHT / 2),
            Align::End,
            &label_style,
            true,
        )?;
        // Filled rectangles end before their second corner.
        let right = left + columns.count() as i32;
        strip
            .draw(&Rectangle::new([(left, top), (right, bottom)], ROW_BACKGROUND.filled()))
            .map_err(drawing)?;
        let marks = shares.iter().enumerate().filter_map(|(i, share)| {
            let share = share.filter(|s| *s > 0.0)?;
            let column = left + i as i32;
            Some(Rectangle::new(
                [(column, top), (column + 1, bottom)],
                tint(*color, share).filled(),
            ))
        });
        for mark in marks {
            strip.draw(&mark).map_err(drawing)?;
        }
    }
    Ok(())
}

/// The row colour for a share of skipped steps: even one skip is visible, all of them give the
/// series' own colour.
fn tint(color: RGBColor, share: f64) -> RGBColor {
    let weight = 0.3 + 0.7 * share.clamp(0.0, 1.0);
    let mix = |background: u8, ink: u8| (background as f64 + (ink as f64 - background as f64) * weight).round() as u8;
    RGBColor(
        mix(ROW_BACKGROUND.0, color.0),
        mix(ROW_BACKGROUND.1, color.1),
        mix(ROW_BACKGROUND.2, color.2),
    )
}

/// The finite value of the latest step that has one.
fn last_finite(losses: &[LossPoint], value: impl Fn(&LossPoint) -> f64) -> Option<f64> {
    losses
        .iter()
        .filter(|p| value(p).is_finite())
        .max_by_key(|p| p.step)
        .map(value)
}
