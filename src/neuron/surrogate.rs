//! Surrogate gradients: the firing step is a Heaviside function whose true derivative is zero
//! almost everywhere, so training substitutes the derivative of a smooth stand-in.

use serde::{Deserialize, Serialize};

/// The smooth stand-in whose derivative replaces the Heaviside step's in backward.
///
/// Formulas and defaults are SpikingJelly's (`surrogate.Sigmoid`, `surrogate.ATan`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Surrogate {
    /// `d S / d x = alpha * sg * (1 - sg)` with `sg = sigmoid(alpha * x)`.
    Sigmoid { alpha: f32 },
    /// `d S / d x = alpha / 2 / (1 + (pi / 2 * alpha * x)^2)`.
    ATan { alpha: f32 },
}

impl Default for Surrogate {
    fn default() -> Self {
        Self::sigmoid()
    }
}

impl Surrogate {
    /// SpikingJelly's default sigmoid surrogate (alpha 4), the one SpikeCLIP trains with.
    pub fn sigmoid() -> Self {
        Self::Sigmoid { alpha: 4.0 }
    }

    /// SpikingJelly's default arctangent surrogate (alpha 2).
    pub fn atan() -> Self {
        Self::ATan { alpha: 2.0 }
    }

    /// The surrogate derivative at `x = H - V_th`.
    pub fn grad(&self, x: f32) -> f32 {
        match *self {
            Self::Sigmoid { alpha } => sigmoid_slope(alpha, x),
            Self::ATan { alpha } => atan_slope(alpha, x),
        }
    }
}

#[inline(always)]
pub(crate) fn sigmoid_slope(alpha: f32, x: f32) -> f32 {
    let sg = 1.0 / (1.0 + exp(-alpha * x));
    alpha * sg * (1.0 - sg)
}

#[inline(always)]
pub(crate) fn atan_slope(alpha: f32, x: f32) -> f32 {
    let z = std::f32::consts::FRAC_PI_2 * alpha * x;
    alpha / 2.0 / (1.0 + z * z)
}

/// `e^x` to about 2 ulp, written so that loops over it vectorise (libm's `expf` is a call per
/// element): Cody-Waite range reduction to |r| <= ln 2 / 2, a degree-6 polynomial (Cephes'
/// coefficients), and the power of two assembled in the exponent bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // exp(-87.3) is the smallest normal float; beyond 88.7 it overflows.
    let x = x.clamp(-87.0, 88.0);
    // Round x / ln 2 to the nearest integer k with the 1.5 * 2^23 trick: k lands in the low
    // mantissa bits, no float-to-int conversion needed.
    const SHIFT: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + SHIFT;
    let k = shifted - SHIFT;
    let r = x - k * 0.693_359_4 - k * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    let k_bits = shifted.to_bits().wrapping_sub(SHIFT.to_bits());
    let two_k = f32::from_bits(k_bits.wrapping_add(127) << 23);
    y * two_k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            assert!(rel < 3e-7, "exp({x}): relative error {rel}");
            x += 0.0137;
        }
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0) > 1e38 && exp(1000.0).is_finite());
    }

    #[test]
    fn peaks_at_threshold_with_known_height() {
        // Sigmoid: alpha / 4 at x = 0; ATan: alpha / 2 at x = 0.
        assert!((Surrogate::sigmoid().grad(0.0) - 1.0).abs() < 1e-7);
        assert!((Surrogate::atan().grad(0.0) - 1.0).abs() < 1e-7);
        assert!(Surrogate::sigmoid().grad(3.0) < Surrogate::sigmoid().grad(0.5));
    }

    #[test]
    fn matches_finite_difference_of_its_primitive() {
        let eps = 1e-3f64;
        for &x in &[-1.3f64, -0.2, 0.0, 0.4, 2.0] {
            let sig = |x: f64| 1.0 / (1.0 + (-4.0 * x).exp());
            let fd = (sig(x + eps) - sig(x - eps)) / (2.0 * eps);
            assert!((Surrogate::sigmoid().grad(x as f32) as f64 - fd).abs() < 1e-4);
            let at = |x: f64| (std::f64::consts::FRAC_PI_2 * 2.0 * x).atan() / std::f64::consts::PI;
            let fd = (at(x + eps) - at(x - eps)) / (2.0 * eps);
            assert!((Surrogate::atan().grad(x as f32) as f64 - fd).abs() < 1e-4);
        }
    }
}
