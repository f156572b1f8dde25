//! Text, laid out and rasterised here with ab_glyph from a font compiled into the binary: the
//! coordinator's image has no system fonts and no fontconfig. (plotters' own ab_glyph text
//! ignores each glyph's left side bearing, which spaces letters unevenly: "l ast", "Dsat".)
//!
//! The typeface is Noto Sans 1.04 (Google, 2012) from the `ttf-noto-sans` crate; the font's
//! own name table licenses it under the Apache License 2.0, which that crate ships with it.

use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, GlyphId, PxScale, ScaleFont, point};
use plotters::prelude::*;

use super::Area;
use super::drawing;
use crate::error::{CoordinatorError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Weight {
    Regular,
    Bold,
}

/// Where the anchor point sits on the text's box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Align {
    Start,
    Middle,
    End,
}

/// A size (pixels per em), weight and colour.
#[derive(Debug, Clone, Copy)]
pub(super) struct Style {
    pub size: f32,
    pub weight: Weight,
    pub color: RGBColor,
}

impl Style {
    pub fn regular(size: f32, color: RGBColor) -> Style {
        Style {
            size,
            weight: Weight::Regular,
            color,
        }
    }

    pub fn bold(size: f32, color: RGBColor) -> Style {
        Style {
            size,
            weight: Weight::Bold,
            color,
        }
    }
}

struct Faces {
    regular: FontRef<'static>,
    bold: FontRef<'static>,
}

/// Parses the embedded fonts once per process.
fn faces() -> Result<&'static Faces> {
    static FACES: OnceLock<Option<Faces>> = OnceLock::new();
    FACES
        .get_or_init(|| {
            Some(Faces {
                regular: FontRef::try_from_slice(ttf_noto_sans::REGULAR).ok()?,
                bold: FontRef::try_from_slice(ttf_noto_sans::BOLD).ok()?,
            })
        })
        .as_ref()
        .ok_or_else(|| CoordinatorError::Plot("the embedded Noto Sans font could not be parsed".to_string()))
}

fn face(style: &Style) -> Result<&'static FontRef<'static>> {
    let faces = faces()?;
    Ok(match style.weight {
        Weight::Regular => &faces.regular,
        Weight::Bold => &faces.bold,
    })
}

/// ab_glyph scales by the font's height (ascent - descent); sizes here are pixels per em, as
/// in CSS, so they do not depend on the font's vertical metrics.
fn scale(font: &FontRef<'static>, size: f32) -> PxScale {
    let units_per_em = font.units_per_em().unwrap_or(1000.0);
    PxScale::from(size * font.height_unscaled() / units_per_em)
}

/// One glyph placed on a baseline at y = 0, starting at x = 0.
struct Placed {
    id: GlyphId,
    x: f32,
}

/// The glyphs of `text` with kerning, and the advance width of the whole.
fn lay_out(font: &FontRef<'static>, scale: PxScale, text: &str) -> (Vec<Placed>, f32) {
    let scaled = font.as_scaled(scale);
    let mut placed = Vec::with_capacity(text.len());
    let mut pen = 0.0f32;
    let mut previous: Option<GlyphId> = None;
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(previous) = previous {
            pen += scaled.kern(previous, id);
        }
        placed.push(Placed { id, x: pen });
        pen += scaled.h_advance(id);
        previous = Some(id);
    }
    (placed, pen)
}

/// The advance width of `text` in pixels.
pub(super) fn width(text: &str, style: &Style) -> Result<f32> {
    let font = face(style)?;
    Ok(lay_out(font, scale(font, style.size), text).1)
}

/// The height of a capital letter: text is centred vertically on it, so digits and capitals
/// (nearly all the plot's text) sit visually centred on their anchor.
fn cap_height(font: &FontRef<'static>, scale: PxScale) -> f32 {
    let glyph = font.glyph_id('H').with_scale_and_position(scale, point(0.0, 0.0));
    font.outline_glyph(glyph)
        .map(|outlined| -outlined.px_bounds().min.y)
        .unwrap_or(scale.y * 0.5)
}

/// Draws `text` with its box aligned on `anchor` (`align` horizontally; vertically centred on
/// the capitals). `upright: false` turns it a quarter counter-clockwise, to read bottom to top
/// beside a y axis; `align` then runs along the turned text.
pub(super) fn draw(
    area: &Area<'_>,
    text: &str,
    anchor: (i32, i32),
    align: Align,
    style: &Style,
    upright: bool,
) -> Result<()> {
    let font = face(style)?;
    let scale = scale(font, style.size);
    let (glyphs, advance) = lay_out(font, scale, text);
    let start = match align {
        Align::Start => 0.0,
        Align::Middle => -advance / 2.0,
        Align::End => -advance,
    };
    let baseline = cap_height(font, scale) / 2.0;
    for glyph in glyphs {
        let positioned = glyph
            .id
            .with_scale_and_position(scale, point(start + glyph.x, baseline));
        let Some(outlined) = font.outline_glyph(positioned) else {
            continue; // a space
        };
        let bounds = outlined.px_bounds();
        let mut result = Ok(());
        outlined.draw(|gx, gy, coverage| {
            if coverage <= 0.0 || result.is_err() {
                return;
            }
            // Along the text and across it, relative to the anchor.
            let along = bounds.min.x as i32 + gx as i32;
            let across = bounds.min.y as i32 + gy as i32;
            let at = if upright {
                (anchor.0 + along, anchor.1 + across)
            } else {
                (anchor.0 + across, anchor.1 - along)
            };
            result = area.draw_pixel(at, &style.color.mix(f64::from(coverage.min(1.0))));
        });
        result.map_err(drawing)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_font_parses_and_lays_out() {
        let style = Style::regular(12.0, RGBColor(0, 0, 0));
        let one = width("0", &style).unwrap();
        assert!(one > 3.0 && one < 12.0, "a digit is {one} px wide at 12 px per em");
        // Noto Sans has tabular digits: every number of n digits is as wide.
        assert!((width("10,000", &style).unwrap() - width("88,888", &style).unwrap()).abs() < 0.01);
        let bold = Style::bold(12.0, RGBColor(0, 0, 0));
        assert!(width("loss", &bold).unwrap() > width("loss", &style).unwrap());
        assert_eq!(width("", &style).unwrap(), 0.0);
    }

    #[test]
    fn glyphs_keep_their_side_bearings() {
        // "ll" drawn: the two stems are separate, not run together.
        let mut buffer = vec![255u8; 60 * 30 * 3];
        {
            let area = BitMapBackend::with_buffer(&mut buffer, (60, 30)).into_drawing_area();
            let style = Style::regular(20.0, RGBColor(0, 0, 0));
            draw(&area, "ll", (5, 15), Align::Start, &style, true).unwrap();
            area.present().unwrap();
        }
        let dark_columns: Vec<bool> = (0..60)
            .map(|x| (0..30).any(|y| buffer[(y * 60 + x) * 3] < 128))
            .collect();
        let stems = dark_columns.windows(2).filter(|w| !w[0] && w[1]).count();
        assert_eq!(stems, 2, "{dark_columns:?}");
        // The first stem starts right of the anchor by its bearing, not on it.
        let first = dark_columns.iter().position(|d| *d).unwrap();
        assert!(first > 5, "the first stem starts at {first}");
    }
}
