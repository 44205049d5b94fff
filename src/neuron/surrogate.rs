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
    #[inline(always)]
    pub fn grad(&self, x: f32) -> f32 {
        match *self {
            Self::Sigmoid { alpha } => {
                let sg = 1.0 / (1.0 + (-alpha * x).exp());
                alpha * sg * (1.0 - sg)
            }
            Self::ATan { alpha } => {
                let z = std::f32::consts::FRAC_PI_2 * alpha * x;
                alpha / 2.0 / (1.0 + z * z)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
