//! Laplacian pyramids of RGB images, one channel plane at a time.
//!
//! The filter is the 5-tap binomial `[1, 4, 6, 4, 1] / 16` in each direction (Burt and
//! Adelson's, and Karras et al.'s), with mirrored borders (`c b | a b c`, the edge pixel not
//! repeated). Going down keeps the even pixels of the blurred level; going up places a level's
//! pixels on the even positions of a zero image of the finer side and blurs with twice the
//! filter's gain per direction, which restores the mean.

/// The smallest side a level may have: a 7x7 patch then still has 4x4 places to sit.
pub(crate) const MIN_LEVEL_SIDE: usize = 10;

const TAPS: [f32; 5] = [1.0 / 16.0, 4.0 / 16.0, 6.0 / 16.0, 4.0 / 16.0, 1.0 / 16.0];

/// The sides of the levels for images of side `size`, finest first: halve (rounding up) while
/// the result is at least [`MIN_LEVEL_SIDE`]. 40 gives 40, 20, 10; 64 gives 64, 32, 16.
pub(crate) fn level_sides(size: usize) -> Vec<usize> {
    let mut sides = vec![size];
    while let Some(&last) = sides.last() {
        let next = last.div_ceil(2);
        if next < MIN_LEVEL_SIDE {
            break;
        }
        sides.push(next);
    }
    sides
}

/// The index `i` (at most two outside `0..n`) mirrored into `0..n`; `n >= 3`.
fn mirror(i: isize, n: usize) -> usize {
    let n = n as isize;
    let j = if i < 0 {
        -i
    } else if i >= n {
        2 * (n - 1) - i
    } else {
        i
    };
    j as usize
}

/// Blurs one `side x side` plane in place with the binomial filter times `gain` per direction.
fn blur(plane: &mut [f32], side: usize, gain: f32, scratch: &mut Vec<f32>) {
    scratch.clear();
    scratch.resize(plane.len(), 0.0);
    let taps = TAPS.map(|t| t * gain);
    for y in 0..side {
        let row = &plane[y * side..(y + 1) * side];
        for x in 0..side {
            let mut sum = 0.0;
            for (k, t) in taps.iter().enumerate() {
                sum += t * row[mirror(x as isize + k as isize - 2, side)];
            }
            scratch[y * side + x] = sum;
        }
    }
    plane.fill(0.0);
    for y in 0..side {
        for (k, t) in taps.iter().enumerate() {
            let from = mirror(y as isize + k as isize - 2, side);
            let (src, dst) = (
                &scratch[from * side..(from + 1) * side],
                &mut plane[y * side..(y + 1) * side],
            );
            for (d, s) in dst.iter_mut().zip(src) {
                *d += t * s;
            }
        }
    }
}

/// Reusable buffers, so building the pyramids of many images allocates once.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    gaussian: Vec<f32>,
    coarser: Vec<f32>,
    expanded: Vec<f32>,
    blur: Vec<f32>,
}

/// Writes the Laplacian pyramid of one interleaved RGB image of side `sides[0]` into `levels`
/// (one planar `[3][side][side]` slice per level of `sides`): every level but the last is its
/// Gaussian level minus the next one expanded, the last is the coarsest Gaussian level itself.
pub(crate) fn laplacian(image: &[u8], sides: &[usize], levels: &mut [&mut [f32]], scratch: &mut Scratch) {
    let side = sides[0];
    debug_assert_eq!(image.len(), side * side * 3);
    let g = &mut scratch.gaussian;
    g.clear();
    g.resize(3 * side * side, 0.0);
    for (p, rgb) in image.chunks_exact(3).enumerate() {
        for c in 0..3 {
            g[c * side * side + p] = f32::from(rgb[c]);
        }
    }
    for (l, &n) in sides.iter().enumerate() {
        let Some(&m) = sides.get(l + 1) else {
            levels[l].copy_from_slice(&scratch.gaussian);
            break;
        };
        scratch.coarser.clear();
        scratch.coarser.resize(3 * m * m, 0.0);
        scratch.expanded.clear();
        scratch.expanded.resize(3 * n * n, 0.0);
        for c in 0..3 {
            let fine = &mut scratch.gaussian[c * n * n..(c + 1) * n * n];
            // Down: blur a copy, keep the even pixels.
            let expanded = &mut scratch.expanded[c * n * n..(c + 1) * n * n];
            expanded.copy_from_slice(fine);
            blur(expanded, n, 1.0, &mut scratch.blur);
            let coarse = &mut scratch.coarser[c * m * m..(c + 1) * m * m];
            for y in 0..m {
                for x in 0..m {
                    coarse[y * m + x] = expanded[2 * y * n + 2 * x];
                }
            }
            // Up: the coarse pixels on the even positions of a zero plane, blurred with gain 2.
            expanded.fill(0.0);
            for y in 0..m {
                for x in 0..m {
                    expanded[2 * y * n + 2 * x] = coarse[y * m + x];
                }
            }
            blur(expanded, n, 2.0, &mut scratch.blur);
            let out = &mut levels[l][c * n * n..(c + 1) * n * n];
            for ((o, f), e) in out.iter_mut().zip(fine.iter()).zip(expanded.iter()) {
                *o = f - e;
            }
        }
        std::mem::swap(&mut scratch.gaussian, &mut scratch.coarser);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_keep_room_for_patches() {
        assert_eq!(level_sides(40), [40, 20, 10]);
        assert_eq!(level_sides(64), [64, 32, 16]);
        assert_eq!(level_sides(16), [16]);
        assert_eq!(level_sides(21), [21, 11]);
    }

    fn pyramid(image: &[u8], sides: &[usize]) -> Vec<Vec<f32>> {
        let mut levels: Vec<Vec<f32>> = sides.iter().map(|n| vec![0.0; 3 * n * n]).collect();
        let mut views: Vec<&mut [f32]> = levels.iter_mut().map(|l| l.as_mut_slice()).collect();
        laplacian(image, sides, &mut views, &mut Scratch::default());
        levels
    }

    #[test]
    fn a_flat_image_has_flat_residual_and_zero_details() {
        let sides = level_sides(40);
        let image: Vec<u8> = (0..40 * 40).flat_map(|_| [10u8, 100, 200]).collect();
        let levels = pyramid(&image, &sides);
        for detail in &levels[..2] {
            assert!(
                detail.iter().all(|v| v.abs() < 1e-4),
                "details of a flat image are not zero"
            );
        }
        let coarse = &levels[2];
        for (c, want) in [10.0, 100.0, 200.0].into_iter().enumerate() {
            assert!(coarse[c * 100..(c + 1) * 100].iter().all(|v| (v - want).abs() < 1e-3));
        }
    }

    #[test]
    fn detail_of_a_checkerboard_sits_in_the_finest_level() {
        let sides = level_sides(20);
        let image: Vec<u8> = (0..20 * 20)
            .flat_map(|p| {
                let v = if (p % 20 + p / 20) % 2 == 0 { 0 } else { 255 };
                [v, v, v]
            })
            .collect();
        let levels = pyramid(&image, &sides);
        let energy = |l: &[f32]| l.iter().map(|v| v * v).sum::<f32>() / l.len() as f32;
        // The binomial filter removes the Nyquist frequency entirely: the residual is flat grey.
        assert!(energy(&levels[0]) > 100.0 * 100.0);
        let residual = &levels[1];
        assert!(residual.iter().all(|v| (v - 127.5).abs() < 1.0), "{residual:?}");
    }
}
