//! The frame both panels share: the same margins and label areas, so the plotting areas have
//! the same left and right edges and one step sits at the same x in both; and the axes,
//! grid and tick labels, drawn from our own ticks (`axis::ticks`).

use std::ops::Range;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::text::{self, Align, Style};
use super::{Area, MUTED, TEXT, axis, drawing};
use crate::error::Result;

pub(super) const MARGIN_LEFT: u32 = 16;
pub(super) const MARGIN_RIGHT: u32 = 30;
const MARGIN_TOP: u32 = 6;
const MARGIN_BOTTOM: u32 = 10;
pub(super) const Y_LABEL_AREA: u32 = 72;
const X_LABEL_AREA: u32 = 44;
const TICK_LENGTH: i32 = 5;

const GRID: RGBColor = RGBColor(230, 230, 230);
const FRAME: RGBColor = RGBColor(140, 140, 140);

pub(super) const TICK_SIZE: f32 = 12.0;
pub(super) const LABEL_SIZE: f32 = 13.0;

pub(super) type Chart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// How many pixel columns the plotting area of a panel `width` wide has.
pub(super) fn plot_columns(width: u32) -> usize {
    width.saturating_sub(MARGIN_LEFT + MARGIN_RIGHT + Y_LABEL_AREA).max(1) as usize
}

/// Builds a panel's chart and draws its grid, frame, ticks and axis labels.
pub(super) fn build<'a, 'b>(area: &'a Area<'b>, x: &Range<f64>, y: &Range<f64>, y_desc: &str) -> Result<Chart<'a, 'b>> {
    let chart = ChartBuilder::on(area)
        .margin_left(MARGIN_LEFT)
        .margin_right(MARGIN_RIGHT)
        .margin_top(MARGIN_TOP)
        .margin_bottom(MARGIN_BOTTOM)
        .x_label_area_size(X_LABEL_AREA)
        .y_label_area_size(Y_LABEL_AREA)
        .build_cartesian_2d(x.clone(), y.clone())
        .map_err(drawing)?;
    let x_ticks = axis::ticks(x, 9, true);
    let y_ticks = axis::ticks(y, 7, false);
    let plot = chart.plotting_area();
    for &v in &x_ticks.values {
        plot.draw(&PathElement::new(vec![(v, y.start), (v, y.end)], GRID))
            .map_err(drawing)?;
    }
    for &v in &y_ticks.values {
        plot.draw(&PathElement::new(vec![(x.start, v), (x.end, v)], GRID))
            .map_err(drawing)?;
    }

    // Everything outside the plotting area is drawn in the panel's own pixels.
    let base = area.get_base_pixel();
    let (px, py) = plot.get_pixel_range();
    let (left, right) = (px.start - base.0, px.end - 1 - base.0);
    let (top, bottom) = (py.start - base.1, py.end - 1 - base.1);
    area.draw(&Rectangle::new([(left, top), (right, bottom)], FRAME))
        .map_err(drawing)?;
    let local = |point: (f64, f64)| {
        let (cx, cy) = chart.backend_coord(&point);
        (cx - base.0, cy - base.1)
    };
    let tick_style = Style::regular(TICK_SIZE, TEXT);
    for &v in &x_ticks.values {
        let (cx, _) = local((v, y.start));
        area.draw(&PathElement::new(vec![(cx, bottom), (cx, bottom + TICK_LENGTH)], FRAME))
            .map_err(drawing)?;
        let label = axis::format_step_tick(v);
        text::draw(
            area,
            &label,
            (cx, bottom + TICK_LENGTH + 11),
            Align::Middle,
            &tick_style,
            true,
        )?;
    }
    for &v in &y_ticks.values {
        let (_, cy) = local((x.start, v));
        area.draw(&PathElement::new(vec![(left - TICK_LENGTH, cy), (left, cy)], FRAME))
            .map_err(drawing)?;
        let label = axis::format_value(v, y_ticks.decimals);
        text::draw(
            area,
            &label,
            (left - TICK_LENGTH - 5, cy),
            Align::End,
            &tick_style,
            true,
        )?;
    }
    let label_style = Style::regular(LABEL_SIZE, MUTED);
    text::draw(
        area,
        "step",
        ((left + right) / 2, bottom + 35),
        Align::Middle,
        &label_style,
        true,
    )?;
    text::draw(
        area,
        y_desc,
        (MARGIN_LEFT as i32 + 6, (top + bottom) / 2),
        Align::Middle,
        &label_style,
        false,
    )?;
    Ok(chart)
}

/// A panel with nothing to show: its empty frame, where the chart would be, and a note.
pub(super) fn draw_note(area: &Area<'_>, message: &str) -> Result<()> {
    let (width, height) = area.dim_in_pixel();
    let left = (MARGIN_LEFT + Y_LABEL_AREA) as i32;
    let right = (width - MARGIN_RIGHT) as i32 - 1;
    let top = MARGIN_TOP as i32;
    let bottom = height.saturating_sub(X_LABEL_AREA + MARGIN_BOTTOM) as i32 - 1;
    area.draw(&Rectangle::new([(left, top), (right, bottom)], FRAME))
        .map_err(drawing)?;
    let at = ((left + right) / 2, (top + bottom) / 2);
    text::draw(area, message, at, Align::Middle, &Style::regular(15.0, MUTED), true)
}

/// The row above a chart that names its series: a key outside the plotting area never hides
/// data, wherever the curves go.
pub(super) const KEY_HEIGHT: u32 = 26;

/// How a key entry is drawn.
#[derive(Debug, Clone, Copy)]
pub(super) enum Swatch {
    Line(RGBColor),
    LineWithDot(RGBColor),
    Band(RGBColor, f64),
    Ring(RGBColor),
}

#[derive(Debug, Clone)]
pub(super) struct KeyItem {
    pub swatch: Swatch,
    pub label: String,
}

/// Draws the key row, its entries left to right from the plotting area's left edge.
pub(super) fn draw_key(area: &Area<'_>, items: &[KeyItem]) -> Result<()> {
    let y = area.dim_in_pixel().1 as i32 / 2;
    let mut x = (MARGIN_LEFT + Y_LABEL_AREA) as i32 + 2;
    let style = Style::regular(LABEL_SIZE, TEXT);
    for item in items {
        let drawn = match item.swatch {
            Swatch::Line(color) => area.draw(&PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3))),
            Swatch::LineWithDot(color) => area
                .draw(&PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(2)))
                .and_then(|_| area.draw(&Circle::new((x + 11, y), 4, color.filled()))),
            Swatch::Band(color, alpha) => area.draw(&Rectangle::new(
                [(x, y - 6), (x + 23, y + 7)],
                color.mix(alpha).filled(),
            )),
            Swatch::Ring(color) => area.draw(&Circle::new((x + 11, y), 7, color.stroke_width(2))),
        };
        drawn.map_err(drawing)?;
        x += 30;
        text::draw(area, &item.label, (x, y), Align::Start, &style, true)?;
        x += text::width(&item.label, &style)?.ceil() as i32 + 28;
    }
    Ok(())
}

/// A line two pixels thick through `points`, as two one-pixel lines a pixel apart: plotters'
/// own wide strokes can shoot spikes far out of the chart on steep, noisy data
/// (plotters-rs/plotters#549), and its one-pixel lines are exact.
pub(super) fn thick_line(chart: &Chart<'_, '_>, points: &[(f64, f64)], color: RGBColor) -> Result<()> {
    let plot = chart.plotting_area();
    let pixels: Vec<(i32, i32)> = points.iter().map(|p| plot.map_coordinate(p)).collect();
    let canvas = plot.strip_coord_spec();
    let (x0, y0) = (canvas.get_base_pixel().0, canvas.get_base_pixel().1);
    for offset in [0, 1] {
        let shifted: Vec<(i32, i32)> = pixels.iter().map(|&(x, y)| (x - x0, y - y0 + offset)).collect();
        canvas
            .draw(&PathElement::new(shifted, color.stroke_width(1)))
            .map_err(drawing)?;
    }
    Ok(())
}
