//! What the recipe needs of a model: its two towers, its weights, and which weights each
//! stage trains.

use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;

use crate::energy::EncoderOps;
use crate::kernels::grad_slot::GradSlot;
use crate::train::checkpoint::named_vars;

/// A dual-encoder student whose weights live in one [`VarMap`] under the prefixes `image.` and
/// `text.`.
pub trait Student {
    /// Image features `[B, D]` of CLIP-normalised 32x32 inputs `[B, 3, 32, 32]`.
    fn image_features(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    /// Text features `[B, D]` of token ids `[B, L]`.
    fn text_features(&self, ids: &Tensor, train: bool) -> Result<Tensor>;
    fn varmap(&self) -> &VarMap;
    /// Where the student's ops write the gradients of the parameters that bypass candle's
    /// `GradStore` (see [`GradSlot`]); a training step collects them with
    /// [`crate::train::grads::Gradients::backward`]. None by default.
    fn grad_slots(&self) -> Vec<GradSlot> {
        Vec::new()
    }
    /// The compute of each encoder for energy accounting, with monitors on its LIF layers;
    /// `None` for a network without spikes.
    fn energy_ops(&self) -> Option<Vec<EncoderOps>> {
        None
    }
    /// The spikes `[T, 1, ...]` of the image encoder's first LIF layers for one image, each
    /// with its layer's name, for the spike raster; `None` for a network without spikes.
    fn layer_spikes(&self, _image: &Tensor) -> Option<Result<Vec<(String, Tensor)>>> {
        None
    }
    /// Time steps of a spiking student (1 for an ANN).
    fn time_steps(&self) -> usize {
        1
    }
    /// This student with its eval-mode image features on the spike-driven path (bit-packed
    /// spikes, accumulate-only layers, popcount attention): same spikes, features equal up to
    /// summation order, faster at trained firing rates. It folds BatchNorm once, so it is for
    /// inference on the weights as they are now. `None` for a network without spikes.
    fn spike_driven(&self) -> Option<Result<Box<dyn Student + '_>>> {
        None
    }
}

/// Buffers that live in the VarMap but are not learned (BatchNorm's running statistics).
fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// The learnable parameters under `prefix` (`"image."` or `"text."`), by name.
pub fn trainable(student: &dyn Student, prefix: &str) -> Vec<(String, Var)> {
    trainable_in(student.varmap(), prefix)
}

/// [`trainable`] of the parameters in `varmap`.
pub fn trainable_in(varmap: &VarMap, prefix: &str) -> Vec<(String, Var)> {
    named_vars(varmap)
        .into_iter()
        .filter(|(name, _)| name.starts_with(prefix) && !is_buffer(name))
        .collect()
}
