//! The score panel: the sliced Wasserstein distance measured at each checkpoint, its points
//! joined by a line, the best one ringed and named in the key above the chart.

use std::ops::Range;

use plotters::prelude::*;

use super::{Area, SWD_COLOR, ScorePoint, axis, chart, drawing, finite_extent};
use crate::error::Result;

/// Past this many checkpoints the markers would merge into a thick line: draw the line only.
const MAX_MARKERS: usize = 300;
const BEST_RING: RGBColor = RGBColor(20, 90, 35);

/// `no_scores`: the note shown while there are none.
pub(super) fn draw(area: &Area<'_>, scores: &[ScorePoint], x: &Range<f64>, no_scores: &str) -> Result<()> {
    let mut points: Vec<(f64, f64)> = scores
        .iter()
        .filter(|p| p.swd.is_finite())
        .map(|p| (p.step as f64, p.swd))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let Some(extent) = finite_extent(points.iter().map(|p| p.1)) else {
        let message = if scores.is_empty() {
            no_scores
        } else {
            "no finite SWD scores yet"
        };
        return chart::draw_note(area, message);
    };
    let (key, area) = area.split_vertically(chart::KEY_HEIGHT);
    let y = axis::padded(extent.start, extent.end, 0.1);
    let chart = chart::build(&area, x, &y, "SWD (lower is better)")?;
    let plot = chart.plotting_area();

    if points.len() > 1 {
        chart::thick_line(&chart, &points, SWD_COLOR)?;
    }
    if points.len() <= MAX_MARKERS {
        for point in &points {
            plot.draw(&Circle::new(*point, 4, SWD_COLOR.filled()))
                .map_err(drawing)?;
        }
    }
    let mut items = Vec::new();
    if let Some(last) = points.last() {
        items.push(chart::KeyItem {
            swatch: chart::Swatch::LineWithDot(SWD_COLOR),
            label: format!("SWD at checkpoints: last {}", axis::format_significant(last.1)),
        });
    }
    if let Some(best) = points.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)) {
        plot.draw(&Circle::new(best, 8, BEST_RING.stroke_width(2)))
            .map_err(drawing)?;
        items.push(chart::KeyItem {
            swatch: chart::Swatch::Ring(BEST_RING),
            label: format!(
                "best {} at step {}",
                axis::format_significant(best.1),
                crate::format::thousands(best.0 as u64)
            ),
        });
    }
    chart::draw_key(&key, &items)
}
