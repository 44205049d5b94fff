//! How the student's ops run, decided in one place.
//!
//! The model describes its computation once; every op that has a fused CPU kernel goes through
//! an [`Ops`] value that its layer got at construction, in the way candle-transformers layers
//! hold their own implementation choice. [`Ops::Fused`] runs our kernels with hand-written
//! backward (CPU only, several times faster and leaner than autograd's composition);
//! [`Ops::Portable`] composes candle's standard ops ([`portable`]), which run on any device.
//! On the CPU the fused kernels are the default and `--ops portable` selects the others (how CI
//! checks that both agree); every other device takes the portable ops.

pub mod device;
pub mod portable;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Result, Tensor};
use candle_nn::BatchNorm;

use crate::kernels::attention::Attention;
use crate::kernels::batch_norm::batch_norm_train_then;
use crate::kernels::grad_slot::SlotParam;
use crate::kernels::lif_linear::{lif_linear_packed, PackedGrad};
use crate::kernels::maxpool::max_pool2d_grad;
use crate::kernels::text_mlp::SlotLinear;
use crate::neuron::MultiStepLif;

/// Which implementation the student's ops run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Ops {
    /// Our CPU kernels with hand-written backward.
    #[default]
    Fused,
    /// candle's standard tensor ops and autograd, on any device.
    Portable,
}

/// Set once per run by `--ops portable`: CPU models then take the portable ops too.
static PORTABLE_ON_CPU: AtomicBool = AtomicBool::new(false);

/// The op that follows a training-mode BatchNorm in [`Ops::batch_norm_then`].
#[derive(Debug, Clone, Copy)]
pub enum Then<'a> {
    /// Max-pooling of `[N, C, H, W]`: kernel, stride, padding.
    MaxPool(usize, usize, usize),
    /// The spiking attention core on `[T, B, N, 3C]`.
    Attention(&'a Attention),
    /// A LIF-fed linear layer, its weight and bias packed as `[O, K + 1]`.
    LifLinear(&'a MultiStepLif, &'a Tensor),
    /// A residual added, shaped as the normalised tensor.
    Add(&'a Tensor),
}

/// The backward of a [`Then`] in the fused path: gradients of its input and parameter.
type ThenGrad = PackedGrad;

impl Ops {
    /// Sets the run-wide `--ops` for the run's `device`: `Some(Portable)` makes every model
    /// built from now on in this process run the portable ops on the CPU too; `None` takes the
    /// device's own (see [`Ops::for_device`]). Refuses the fused ops off the CPU.
    pub fn choose_for_run(ops: Option<Self>, device: &Device) -> anyhow::Result<()> {
        if ops == Some(Ops::Fused) && !device.is_cpu() {
            anyhow::bail!(
                "--ops fused: the fused kernels run on the CPU only, not on {}; use --ops portable",
                device::name(device)
            )
        }
        PORTABLE_ON_CPU.store(ops == Some(Ops::Portable), Ordering::Relaxed);
        Ok(())
    }

    /// The ops a model on `device` runs: the fused kernels on the CPU unless the run chose the
    /// portable ones, the portable ops elsewhere.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() && !PORTABLE_ON_CPU.load(Ordering::Relaxed) {
            Ops::Fused
        } else {
            Ops::Portable
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Ops::Fused => "fused",
            Ops::Portable => "portable",
        }
    }

    /// Spikes `[T, ...]` of `lif` on `x [T, ...]`.
    pub fn lif(self, lif: &MultiStepLif, x: &Tensor) -> Result<Tensor> {
        match self {
            Ops::Fused => lif.forward(x),
            Ops::Portable => portable::lif(lif, x),
        }
    }

    /// Stride-1 convolution of `x [N, C, H, W]` by `weight [O, C, k, k]`.
    pub fn conv2d(self, x: &Tensor, weight: &Tensor, padding: usize) -> Result<Tensor> {
        match self {
            Ops::Fused => crate::kernels::conv::conv2d(x, weight, padding, 1),
            Ops::Portable => portable::conv2d(x, weight, padding),
        }
    }

    /// `lif(x) . weight^T + bias` for `x [T, ..., K]`.
    pub fn lif_linear(
        self,
        lif: &MultiStepLif,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        match self {
            Ops::Fused => crate::kernels::lif_linear::lif_linear(lif, x, weight, bias),
            Ops::Portable => portable::lif_linear(lif, x, weight, bias),
        }
    }

    /// `conv2d(lif(x), weight) + bias` for `x [T, B, C, H, W]`: `[T * B, O, H', W']`.
    pub fn lif_conv2d(
        self,
        lif: &MultiStepLif,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        padding: usize,
    ) -> Result<Tensor> {
        match self {
            Ops::Fused => crate::kernels::lif_linear::lif_conv2d(lif, x, weight, bias, padding),
            Ops::Portable => portable::lif_conv2d(lif, x, weight, bias, padding),
        }
    }

    /// Training-mode BatchNorms `bns` on `x [N, C, ...]`, their channels side by side, running
    /// statistics updated.
    pub fn batch_norm_train(self, x: &Tensor, bns: &[&BatchNorm]) -> Result<Tensor> {
        match self {
            Ops::Fused => crate::kernels::batch_norm::batch_norm_train(x, bns),
            Ops::Portable => portable::batch_norm_train(x, bns),
        }
    }

    /// `then` of the training-mode BatchNorms `bns` of `x [N, C, ...]`, the normalised tensor
    /// reshaped to `shape` on its way. The fused path keeps only `x` for backward and
    /// recomputes the normalised tensor (see [`batch_norm_train_then`]); the portable one is
    /// the plain composition.
    pub fn batch_norm_then(
        self,
        x: &Tensor,
        bns: &[&BatchNorm],
        shape: &[usize],
        then: Then,
    ) -> Result<Tensor> {
        if self == Ops::Portable {
            let y = portable::batch_norm_train(x, bns)?.reshape(shape)?;
            return match then {
                Then::MaxPool(k, s, p) => portable::max_pool2d(&y, k, s, p),
                Then::Attention(core) => portable::attention(core, &y),
                Then::LifLinear(lif, packed) => {
                    let k = packed.dim(1)? - 1;
                    let bias = packed.narrow(1, k, 1)?.squeeze(1)?;
                    portable::lif_linear(lif, &y, &packed.narrow(1, 0, k)?, Some(&bias))
                }
                Then::Add(residual) => y + residual,
            };
        }
        let param = match then {
            Then::LifLinear(_, packed) => Some(packed),
            Then::Add(residual) => Some(residual),
            Then::MaxPool(..) | Then::Attention(_) => None,
        };
        let shape = shape.to_vec();
        batch_norm_train_then(x, bns, param, |y| {
            let (value, grad) = fused_then(then, &y.reshape(shape.as_slice())?)?;
            let reshaped = move |y: &Tensor, g: &Tensor| {
                let (grad_y, grad_param) = grad(&y.reshape(shape.as_slice())?, g)?;
                Ok((grad_y.reshape(y.shape())?, grad_param))
            };
            Ok((value, reshaped))
        })
    }

    /// Max-pooling of `x [N, C, H, W]` (window, stride, padding), as PyTorch's.
    pub fn max_pool2d(self, x: &Tensor, (k, s, p): (usize, usize, usize)) -> Result<Tensor> {
        match self {
            Ops::Fused => crate::kernels::maxpool::max_pool2d(x, k, s, p),
            Ops::Portable => portable::max_pool2d(x, k, s, p),
        }
    }

    /// The spiking attention core `core` on `qkv [T, B, N, 3C]`.
    pub fn attention(self, core: &Attention, qkv: &Tensor) -> Result<Tensor> {
        match self {
            Ops::Fused => core.forward(qkv),
            Ops::Portable => portable::attention(core, qkv),
        }
    }

    /// `token[ids] + position[..L]` for ids `[B, L]`: `[B, L, W]`. The fused op writes the
    /// tables' gradients to their slots, the portable one to candle's store.
    pub fn token_embedding(
        self,
        ids: &Tensor,
        token: &SlotParam,
        position: &SlotParam,
    ) -> Result<Tensor> {
        match self {
            Ops::Fused => crate::kernels::embedding::token_embedding(ids, token, position),
            Ops::Portable => portable::token_embedding(ids, token, position),
        }
    }

    /// The spiking text MLP, `[T, B, O]` of ids `[B, L]` (see
    /// [`crate::kernels::text_mlp::text_mlp`]).
    pub fn text_mlp(
        self,
        ids: &Tensor,
        embedding: (&SlotParam, &SlotParam),
        layers: [(&MultiStepLif, &SlotLinear); 2],
        steps: usize,
    ) -> Result<Tensor> {
        match self {
            Ops::Fused => crate::kernels::text_mlp::text_mlp(ids, embedding, layers, steps),
            Ops::Portable => {
                let [(l1, f1), (l2, f2)] = layers;
                let layers = [
                    (l1, (f1.weight.value(), f1.bias.value())),
                    (l2, (f2.weight.value(), f2.bias.value())),
                ];
                portable::text_mlp(ids, embedding, layers, steps)
            }
        }
    }
}

/// The fused value of `then` on the normalised tensor `y`, and its backward.
fn fused_then(then: Then, y: &Tensor) -> Result<(Tensor, ThenGrad)> {
    Ok(match then {
        Then::MaxPool(k, s, p) => {
            let grad = move |y: &Tensor, g: &Tensor| Ok((max_pool2d_grad(y, g, k, s, p)?, None));
            (
                crate::kernels::maxpool::max_pool2d(y, k, s, p)?,
                Box::new(grad),
            )
        }
        Then::Attention(core) => {
            let back = core.clone();
            let grad = move |y: &Tensor, g: &Tensor| Ok((back.gradient(y, g)?, None));
            (core.value(y)?, Box::new(grad))
        }
        Then::LifLinear(lif, packed) => lif_linear_packed(lif, y, packed)?,
        Then::Add(residual) => {
            let grad = |_: &Tensor, g: &Tensor| Ok((g.clone(), Some(g.clone())));
            ((y + residual.detach())?, Box::new(grad))
        }
    })
}
