//! Optional gradient compression on the upload: bf16 on the wire, with error feedback.
//!
//! A bf16 keeps f32's exponent and 8 of its 24 significand bits, so rounding a gradient to it
//! loses up to 2^-9 of each value. Error feedback carries what was lost into the next step's
//! upload from the same shard: the worker sends `bf16(gradient + residual)` and keeps
//! `residual = (gradient + residual) - sent`. Over many steps the values delivered then sum
//! to the gradients' sum minus one residual, so the rounding does not accumulate.
//!
//! Only gradients are compressed. Parameters are broadcast as f32, so every replica holds the
//! coordinator's master copy exactly.

use serde::{Deserialize, Serialize};

/// How workers encode gradients for the coordinator (`cluster.gradient_compression`). In the
/// spec it is a string; serde's default enum form would also take a table such as
/// `{ bf16 = {} }`, which no user means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum GradientCompression {
    /// Little-endian f32: exact.
    #[default]
    None,
    /// Little-endian bf16 with error feedback: half the bytes.
    Bf16,
}

impl TryFrom<String> for GradientCompression {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        match name.as_str() {
            "none" => Ok(GradientCompression::None),
            "bf16" => Ok(GradientCompression::Bf16),
            other => Err(format!("expected \"none\" or \"bf16\", found {other:?}")),
        }
    }
}

impl From<GradientCompression> for &'static str {
    fn from(compression: GradientCompression) -> &'static str {
        match compression {
            GradientCompression::None => "none",
            GradientCompression::Bf16 => "bf16",
        }
    }
}

impl GradientCompression {
    /// Bytes per gradient value on the wire.
    pub fn value_bytes(self) -> usize {
        match self {
            GradientCompression::None => 4,
            GradientCompression::Bf16 => 2,
        }
    }

    /// Adds `weight` times each value encoded in `bytes` to `sum` (as long as `sum` has values),
    /// in order; with `first`, to zero instead of what `sum` holds (the same bits as zeroing it
    /// first, without the pass). Returns false if a value is not finite. One loop per encoding,
    /// so each is compiled, and vectorised, with its own decoding.
    pub fn add_weighted(self, sum: &mut [f32], bytes: &[u8], weight: f32, first: bool) -> bool {
        match self {
            GradientCompression::None => add_decoded(sum, bytes, weight, first, f32::from_le_bytes),
            GradientCompression::Bf16 => add_decoded(sum, bytes, weight, first, |b| widen(u16::from_le_bytes(b))),
        }
    }
}

fn add_decoded<const N: usize>(
    sum: &mut [f32],
    bytes: &[u8],
    weight: f32,
    first: bool,
    decode: impl Fn([u8; N]) -> f32,
) -> bool {
    let mut finite = true;
    for (acc, value) in sum.iter_mut().zip(bytes.chunks_exact(N)) {
        let v = decode(value.try_into().expect("chunks_exact gives N bytes"));
        finite &= v.is_finite();
        // `0.0 + x` is not `x` for x = -0.0: written out so the bits match a zeroed buffer.
        let earlier = if first { 0.0 } else { *acc };
        *acc = earlier + weight * v;
    }
    finite
}

/// One shard's residual for one network, kept by the worker that computes the shard.
///
/// A step can be attempted more than once (a worker was lost, or a gradient was not finite):
/// the coordinator undoes the failed attempt, so a retry must start from the residual the
/// step started with, not from what the failed attempt left. Both are kept.
#[derive(Debug, Clone)]
pub struct ErrorFeedback {
    /// The step the last upload was for.
    step: Option<u64>,
    /// The residual that step started from.
    before: Vec<f32>,
    /// The residual that step left.
    after: Vec<f32>,
}

impl ErrorFeedback {
    pub fn new(len: usize) -> Self {
        ErrorFeedback {
            step: None,
            before: vec![0.0; len],
            after: vec![0.0; len],
        }
    }

    /// Rounds `gradient` plus the residual to bf16 for `step` and returns the little-endian
    /// bytes that go on the wire. Steps must not go backwards; the same step again is a retry
    /// and rounds from the same residual. A gradient with a value that is not finite leaves
    /// the residual as it was (the coordinator refuses that upload, so nothing of it was
    /// delivered).
    pub fn compress(&mut self, step: u64, gradient: &[f32]) -> Vec<u8> {
        assert_eq!(
            gradient.len(),
            self.after.len(),
            "gradient length differs from the residual's"
        );
        if self.step != Some(step) {
            // The previous step is over: what it left is where this one starts.
            std::mem::swap(&mut self.before, &mut self.after);
            self.step = Some(step);
        }
        let mut sent = vec![0u8; gradient.len() * 2];
        let mut finite = true;
        let values = gradient.iter().zip(&self.before).zip(&mut self.after);
        for (((g, before), after), out) in values.zip(sent.chunks_exact_mut(2)) {
            let wanted = g + before;
            let rounded = round_to_bf16(wanted);
            let sent_value = widen(rounded);
            // Not finite when `wanted` is not, or when it rounds up past bf16's largest value.
            finite &= sent_value.is_finite();
            *after = wanted - sent_value;
            out.copy_from_slice(&rounded.to_le_bytes());
        }
        if !finite {
            self.after.copy_from_slice(&self.before);
        }
        sent
    }

    /// The residual the last upload left.
    pub fn residual(&self) -> &[f32] {
        &self.after
    }
}

/// The bits of the bf16 nearest to `value` (ties to even), as IEEE 754 rounds: a bf16 is the
/// top half of an f32, so rounding adds just under half of the dropped half (plus one when the
/// kept part is odd) and shifts. A NaN becomes the quiet NaN (the addition could carry a NaN
/// into an infinity or a zero). Written out rather than taken from `half`, whose per-value
/// branch keeps the loop from vectorising (3-5x slower on a 4-million-value gradient); the
/// tests check it against `half` bit for bit.
#[inline]
pub fn round_to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    let odd = (bits >> 16) & 1;
    let rounded = (bits.wrapping_add(0x7FFF + odd) >> 16) as u16;
    // A select, not a branch: the loop stays vectorised.
    if value.is_nan() { QUIET_NAN } else { rounded }
}

/// bf16's canonical quiet NaN.
const QUIET_NAN: u16 = 0x7FC0;

/// The f32 a bf16 stands for, exactly.
#[inline]
pub fn widen(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// What the coordinator decodes from bf16 bytes: the values the mean is taken over.
pub fn widen_all(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| widen(u16::from_le_bytes([b[0], b[1]])))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_and_keeps_the_exponent() {
        let mut feedback = ErrorFeedback::new(3);
        let sent = widen_all(&feedback.compress(1, &[1.0, 1.0 + 1.0 / 256.0, 3e-30]));
        assert_eq!(sent[0], 1.0);
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to even.
        assert_eq!(sent[1], 1.0);
        assert!((sent[2] - 3e-30).abs() < 3e-30 / 256.0, "tiny values keep their scale");
        assert_eq!(feedback.residual()[1], 1.0 / 256.0);
    }

    #[test]
    fn what_is_delivered_sums_to_the_gradients_minus_one_residual() {
        let len = 1000;
        let mut feedback = ErrorFeedback::new(len);
        let mut delivered = vec![0f64; len];
        let mut wanted = vec![0f64; len];
        let mut plain = vec![0f64; len];
        for step in 1..=200u64 {
            let gradient: Vec<f32> = (0..len)
                .map(|i| ((i as f32 * 0.37 + step as f32 * 1.3).sin()) * 1e-3)
                .collect();
            for ((w, p), g) in wanted.iter_mut().zip(&mut plain).zip(&gradient) {
                *w += f64::from(*g);
                *p += f64::from(widen(round_to_bf16(*g)));
            }
            for (d, s) in delivered.iter_mut().zip(widen_all(&feedback.compress(step, &gradient))) {
                *d += f64::from(s);
            }
        }
        let mut lost_with_feedback = 0f64;
        let mut lost_without = 0f64;
        let mut largest_residual = 0f64;
        for i in 0..len {
            let residual = f64::from(feedback.residual()[i]);
            lost_with_feedback = lost_with_feedback.max((delivered[i] + residual - wanted[i]).abs());
            lost_without = lost_without.max((plain[i] - wanted[i]).abs());
            largest_residual = largest_residual.max(residual.abs());
        }
        // Up to f32 rounding of the additions, nothing is lost but the last residual, which
        // is at most half a bf16 step of one value; plain rounding loses far more.
        assert!(lost_with_feedback < 1e-7, "error feedback lost {lost_with_feedback}");
        assert!(largest_residual < 1e-5, "the residual grew to {largest_residual}");
        assert!(
            lost_without > 100.0 * lost_with_feedback,
            "plain bf16 lost {lost_without}, error feedback {lost_with_feedback}"
        );
    }

    #[test]
    fn a_retry_rounds_from_the_residual_its_step_started_with() {
        let mut feedback = ErrorFeedback::new(2);
        feedback.compress(1, &[0.1, 0.2]);
        let first = feedback.compress(2, &[0.3, 0.4]);
        let residual = feedback.residual().to_vec();
        // Step 2 again (the attempt was undone), then again: the same bits each time.
        assert_eq!(feedback.compress(2, &[0.3, 0.4]), first);
        assert_eq!(feedback.residual(), residual);
        // A different gradient on retry (another attempt's batch) still starts from step 1's.
        let mut fresh = ErrorFeedback::new(2);
        fresh.compress(1, &[0.1, 0.2]);
        assert_eq!(feedback.compress(2, &[0.5, 0.6]), fresh.compress(2, &[0.5, 0.6]));
    }

    #[test]
    fn a_non_finite_gradient_leaves_the_residual_alone() {
        let mut feedback = ErrorFeedback::new(2);
        feedback.compress(1, &[0.1, 0.2]);
        let residual = feedback.residual().to_vec();
        let sent = widen_all(&feedback.compress(2, &[f32::NAN, 0.3]));
        assert!(
            sent[0].is_nan(),
            "the coordinator must see the NaN to refuse the upload"
        );
        assert_eq!(feedback.residual(), residual);
    }

    #[test]
    fn rounding_matches_the_half_crate_bit_for_bit() {
        use half::bf16;
        let mut cases = vec![
            0.0f32,
            -0.0,
            1.0,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        // Ties with an even and an odd kept part, and just either side of a tie.
        cases.extend([0x3F80_8000u32, 0x3F81_8000, 0x3F80_8001, 0x3F80_7FFF, 0xBF81_8000].map(f32::from_bits));
        // Every 65,537th bit pattern: every exponent and sign, with varied dropped halves.
        cases.extend(
            (0..=u32::MAX)
                .step_by(65_537)
                .map(f32::from_bits)
                .filter(|v| !v.is_nan()),
        );
        for v in cases {
            assert_eq!(
                round_to_bf16(v),
                bf16::from_f32(v).to_bits(),
                "{v:e} ({:#010x})",
                v.to_bits()
            );
            let bits = bf16::from_f32(v).to_bits();
            assert_eq!(widen(bits).to_bits(), bf16::from_bits(bits).to_f32().to_bits());
        }
        // A NaN stays a NaN, whatever its payload (all ones would carry into -0.0).
        for nan in [0x7FC0_0000u32, 0x7F80_0001, 0xFFC0_1234, 0x7FFF_FFFF, 0xFFFF_FFFF] {
            assert!(widen(round_to_bf16(f32::from_bits(nan))).is_nan(), "{nan:#010x}");
        }
    }

    #[test]
    fn a_value_that_rounds_past_the_largest_bf16_is_refused_not_carried() {
        let mut feedback = ErrorFeedback::new(2);
        let sent = widen_all(&feedback.compress(1, &[f32::MAX, 0.5]));
        assert_eq!(sent[0], f32::INFINITY, "f32::MAX rounds up to infinity in bf16");
        assert_eq!(feedback.residual(), [0.0, 0.0], "no infinite residual is kept");
    }

    #[test]
    fn both_encodings_add_weighted_values_and_report_non_finite_ones() {
        let mut sum = [1.0f32, 1.0];
        let bf16: Vec<u8> = [-2.5f32, 4.0]
            .iter()
            .flat_map(|&v| round_to_bf16(v).to_le_bytes())
            .collect();
        assert!(GradientCompression::Bf16.add_weighted(&mut sum, &bf16, 0.5, false));
        assert_eq!(sum, [-0.25, 3.0]);
        let f32s: Vec<u8> = [1.25f32, f32::NAN].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(!GradientCompression::None.add_weighted(&mut sum, &f32s, 2.0, false));
        assert_eq!(sum[0], 2.25);
        assert_eq!(GradientCompression::Bf16.value_bytes(), 2);
    }
}
