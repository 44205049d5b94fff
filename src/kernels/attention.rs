//! The core of spiking self-attention, `LIF(q) . LIF(k)^T . LIF(v) * scale` per head, as one
//! differentiable op over the stacked q, k and v inputs.
//!
//! Composed from candle ops, autograd keeps every intermediate until backward: the three spike
//! tensors, their per-head copies, `k^T`, the `[N, N]` scores, the product and its scaled and
//! re-laid-out copies, about ten tensors of the block's activation size, the largest share of
//! a training step's memory. This op keeps only its input and recomputes the rest in backward
//! (three LIF passes and one matmul more, a small fraction of the step).

use candle_core::{Result, Tensor};

use super::{batched, layout, with_backward};
use crate::neuron::MultiStepLif;

/// How the heads are laid out and scaled, which neurons fire q, k and v, and which keys count.
#[derive(Debug, Clone)]
pub struct Attention {
    pub lifs: [MultiStepLif; 3],
    pub heads: usize,
    /// The product's scale (no softmax follows).
    pub scale: f64,
    /// `[B, N]`, 1 for tokens, 0 for padding: zeroes the keys of padding, which without a
    /// softmax removes that token's value from every query's output.
    pub key_mask: Option<Tensor>,
}

impl Attention {
    /// `[T, B, N, C]` to `[T * B * heads, N, C / heads]`, contiguous: candle's CPU matmul
    /// wants 3-D contiguous inputs.
    pub fn split(&self, y: &Tensor) -> Result<Tensor> {
        let (t, b, n, c) = y.dims4()?;
        let h = self.heads;
        layout::contiguous(&y.reshape((t, b, n, h, c / h))?.transpose(2, 3)?)?.reshape((
            t * b * h,
            n,
            c / h,
        ))
    }

    /// The inverse of [`Self::split`] for `[T, B, N, C]`.
    pub fn merge(&self, y: &Tensor, (t, b, n, c): (usize, usize, usize, usize)) -> Result<Tensor> {
        let heads_last = y.reshape((t, b, self.heads, n, c / self.heads))?;
        layout::contiguous(&heads_last.transpose(2, 3)?)?.reshape((t, b, n, c))
    }

    /// `(q k^T) v * scale` for `qkv [T, B, N, 3C]`, q, k and v side by side on the last axis:
    /// `[T, B, N, C]`, with the values and gradient of the same composed from candle ops.
    pub fn forward(&self, qkv: &Tensor) -> Result<Tensor> {
        let y = self.value(&qkv.detach())?;
        let this = self.clone();
        with_backward("spiking-attention", qkv, y, move |qkv, grad| {
            this.gradient(qkv, grad)
        })
    }

    /// [`Self::forward`]'s value, without autograd.
    pub fn value(&self, qkv: &Tensor) -> Result<Tensor> {
        let dims = self.dims(qkv)?;
        let [q, k, v] = self.spikes(qkv, &self.lifs)?;
        let product = batched::matmul(&batched::matmul(&q, &k.t()?)?, &v)?;
        self.merge(&(product * self.scale)?, dims)
    }

    /// The gradient of `qkv` through [`Self::forward`] given the output's: the spikes
    /// recomputed (by neurons without monitors, which would count them twice), the product
    /// differentiated per head, then each LIF's own backward.
    pub fn gradient(&self, qkv: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let qkv = qkv.detach();
        let dims = self.dims(&qkv)?;
        let silent = self.lifs.clone().map(|l| MultiStepLif::new(*l.config()));
        let [q, k, v] = self.spikes(&qkv, &silent)?;
        let g = self.split(&(grad.detach() * self.scale)?)?;
        let scores = batched::matmul(&q, &k.t()?)?;
        let grad_v = batched::matmul(&scores.t()?, &g)?;
        drop(scores);
        let grad_scores = batched::matmul(&g, &v.t()?)?;
        let grad_q = batched::matmul(&grad_scores, &k)?;
        let grad_k = batched::matmul(&grad_scores.t()?, &q)?;
        let mut grad_k = self.merge(&grad_k, dims)?;
        if let Some(m) = self.mask(dims)? {
            grad_k = grad_k.broadcast_mul(&m)?;
        }
        let c = dims.3;
        let grads = [
            self.merge(&grad_q, dims)?,
            grad_k,
            self.merge(&grad_v, dims)?,
        ];
        let inputs = grads
            .iter()
            .enumerate()
            .map(|(i, g)| silent[i].input_gradient(&qkv.narrow(3, i * c, c)?, g))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&inputs, 3)
    }

    /// `(T, B, N, C)` of the output for `qkv`.
    fn dims(&self, qkv: &Tensor) -> Result<(usize, usize, usize, usize)> {
        let (t, b, n, c3) = qkv.dims4()?;
        if c3 % 3 != 0 || (c3 / 3) % self.heads != 0 {
            candle_core::bail!(
                "attention: {c3} channels are not q, k, v of {} heads",
                self.heads
            )
        }
        Ok((t, b, n, c3 / 3))
    }

    /// The key mask as `[1, B, N, 1]`.
    fn mask(&self, (_, b, n, _): (usize, usize, usize, usize)) -> Result<Option<Tensor>> {
        self.key_mask
            .as_ref()
            .map(|m| m.detach().reshape((1, b, n, 1)))
            .transpose()
    }

    /// Split spikes of q, k (masked) and v from `qkv` by `lifs`.
    fn spikes(&self, qkv: &Tensor, lifs: &[MultiStepLif; 3]) -> Result<[Tensor; 3]> {
        let dims = self.dims(qkv)?;
        let (c, mask) = (dims.3, self.mask(dims)?);
        let fire = |i: usize| -> Result<Tensor> {
            let s = lifs[i].forward(&qkv.narrow(3, i * c, c)?)?;
            match (i, &mask) {
                (1, Some(m)) => self.split(&s.broadcast_mul(m)?),
                _ => self.split(&s),
            }
        };
        Ok([fire(0)?, fire(1)?, fire(2)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::*;
    use crate::neuron::LifConfig;
    use candle_core::{Device, Var};

    /// Values and gradient equal the composition from candle ops, with and without a key mask.
    fn matches_composed(masked: bool) {
        let dev = Device::Cpu;
        let (t, b, n, c) = (4, 2, 5, 12);
        let qkv = Var::from_tensor(
            &(Tensor::randn(0f32, 1.0, (t, b, n, 3 * c), &dev).unwrap() + 0.8).unwrap(),
        )
        .unwrap();
        let att = Attention {
            lifs: [0.5, 1.0, 0.75].map(|th| {
                MultiStepLif::new(LifConfig {
                    v_threshold: th,
                    ..LifConfig::default()
                })
            }),
            heads: 3,
            scale: 0.125,
            key_mask: masked.then(|| {
                Tensor::from_vec(vec![1f32, 1., 1., 0., 0., 1., 1., 1., 1., 0.], (b, n), &dev)
                    .unwrap()
            }),
        };
        let ours = att.forward(qkv.as_tensor()).unwrap();
        let fire = |i: usize| {
            let s = att.lifs[i]
                .forward(&qkv.as_tensor().narrow(3, i * c, c).unwrap())
                .unwrap();
            match (i, &att.key_mask) {
                (1, Some(m)) => s.broadcast_mul(&m.reshape((1, b, n, 1)).unwrap()).unwrap(),
                _ => s,
            }
        };
        let [q, k, v] = [0, 1, 2].map(|i| att.split(&fire(i)).unwrap());
        let product = q
            .matmul(&k.t().unwrap().contiguous().unwrap())
            .unwrap()
            .matmul(&v)
            .unwrap()
            .affine(0.125, 0.0)
            .unwrap();
        let composed = att.merge(&product, (t, b, n, c)).unwrap();
        assert_eq!(ours.dims(), &[t, b, n, c]);
        assert!(
            composed
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
        assert!(max_rel_diff(&ours, &composed) < 1e-6);
        assert_same_gradients(ours, composed, &[&qkv], 1e-5);
    }

    #[test]
    fn matches_composed_lifs_and_matmuls() {
        matches_composed(false)
    }

    #[test]
    fn matches_composed_with_a_key_mask() {
        matches_composed(true)
    }
}
