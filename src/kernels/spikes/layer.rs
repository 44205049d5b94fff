//! Spike-driven linear layers and convolutions, their weights prepared once.

use std::ops::Range;

use candle_core::{Device, Result, Tensor};

use super::bits::SpikeBits;
use super::gather::{BlockedWeights, Gather, Placement, Windows, LAYER};
use crate::kernels::conv::Window;
use crate::kernels::layout;
use crate::kernels::simd;
use crate::neuron::MultiStepLif;

/// A layer fed by spikes with its weights prepared once for the accumulate-only kernels: a
/// linear layer `[O, K]` or a convolution `[O, C, kh, kw]`, with an optional bias (where a
/// folded BatchNorm's shift goes).
#[derive(Debug, Clone)]
pub struct SpikeLayer {
    pub(super) weights: BlockedWeights,
    kernel: (usize, usize),
}

impl SpikeLayer {
    /// A linear layer `weight [O, K]`, or a convolution `weight [O, C, kh, kw]`.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let weight = match weight.rank() {
            2 => weight.unsqueeze(2)?.unsqueeze(3)?,
            4 => weight.clone(),
            _ => candle_core::bail!(
                "spike layer: weight must be [O, K] or [O, C, kh, kw], got {:?}",
                weight.dims()
            ),
        };
        let (_, _, kh, kw) = weight.dims4()?;
        Ok(Self {
            weights: BlockedWeights::new(&weight, bias)?,
            kernel: (kh, kw),
        })
    }

    /// `spikes [..., K] -> [..., O]` for a linear layer.
    pub fn linear(&self, spikes: &SpikeBits, device: &Device) -> Result<Tensor> {
        self.check_linear(spikes)?;
        let o = self.weights.outputs;
        let out = Gather {
            windows: Windows::rows(spikes),
            weights: &self.weights,
            schedule: LAYER,
        }
        .run();
        let mut shape = spikes.shape[..spikes.shape.len() - 1].to_vec();
        shape.push(o);
        Tensor::from_vec(out, shape, device)
    }

    /// [`Self::linear`] then `lif` over the spikes' leading axis of steps: `[T, ..., K]` to the
    /// bits `lif.forward_bits` gives of the output shaped `[T, ..., groups, O / groups]`
    /// (`[T, ..., O]` for one group), the f32 output never written whole (see
    /// [`Gather::run_fired`]). Counted by the LIF's monitor.
    pub fn linear_fired(
        &self,
        spikes: &SpikeBits,
        lif: &MultiStepLif,
        groups: usize,
    ) -> Result<SpikeBits> {
        self.check_linear(spikes)?;
        let gather = Gather {
            windows: Windows::rows(spikes),
            weights: &self.weights,
            schedule: LAYER,
        };
        let rows = spikes.shape[..spikes.shape.len() - 1].to_vec();
        self.fired(&gather, lif, (spikes.shape[0], groups), rows)
    }

    /// `gather` through `lif` over `steps` steps, its outputs in `groups`, as bits of shape
    /// `rows` then the groups' columns.
    fn fired(
        &self,
        gather: &Gather,
        lif: &MultiStepLif,
        (steps, groups): (usize, usize),
        mut shape: Vec<usize>,
    ) -> Result<SpikeBits> {
        lif.check_config()?;
        let (o, pixels) = (self.weights.outputs, gather.windows.pixels());
        if steps == 0 || !pixels.is_multiple_of(steps) || groups == 0 || !o.is_multiple_of(groups) {
            candle_core::bail!(
                "spike layer into a LIF: {pixels} output rows over {steps} steps, {o} outputs \
                 in {groups} groups"
            )
        }
        if groups > 1 {
            shape.push(groups);
        }
        shape.push(o / groups);
        let bits = SpikeBits::from_words(gather.run_fired(lif, steps, groups), shape)?;
        lif.observe(&bits)?;
        Ok(bits)
    }

    /// That this is a linear layer over the spikes' features.
    pub(super) fn check_linear(&self, spikes: &SpikeBits) -> Result<()> {
        let k = self.weights.inputs;
        if self.kernel != (1, 1) || spikes.cols() != k {
            candle_core::bail!(
                "spike_linear: spikes have {} features, weight expects {k} (kernel {:?})",
                spikes.cols(),
                self.kernel
            )
        }
        Ok(())
    }

    /// Convolution of channels-last spikes `[B, H, W, C]` (see
    /// [`SpikeBits::pack_channels_last`]): `[B, O, Ho, Wo]`, equal to the dense `conv2d` of the
    /// unpacked spikes.
    pub fn conv2d(
        &self,
        spikes: &SpikeBits,
        padding: usize,
        stride: usize,
        device: &Device,
    ) -> Result<Tensor> {
        layout::contiguous(
            &self
                .conv2d_channels_last(spikes, padding, stride, device)?
                .permute((0, 3, 1, 2))?,
        )
    }

    /// [`Self::conv2d`] left channels-last, `[B, Ho, Wo, O]`, as the kernel writes it: the
    /// layout the next spike-driven layer reads, so a chain of them needs no transposes.
    pub fn conv2d_channels_last(
        &self,
        spikes: &SpikeBits,
        padding: usize,
        stride: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let gather = self.conv_gather(spikes, padding, stride)?;
        let (b, _, _, _) = gather.windows.dims;
        let (ho, wo) = gather.windows.out_hw;
        let out = gather.run();
        Tensor::from_vec(out, (b, ho, wo, self.weights.outputs), device)
    }

    /// [`Self::conv2d_channels_last`] of spikes `[T * B, H, W, C]`, `steps` = T, then `lif`:
    /// the bits `lif.forward_bits` gives of the output shaped `[T, B, Ho, Wo, O]`, the f32
    /// output never written whole (see [`Gather::run_fired`]). Counted by the LIF's monitor.
    pub fn conv2d_channels_last_fired(
        &self,
        spikes: &SpikeBits,
        (padding, stride): (usize, usize),
        steps: usize,
        lif: &MultiStepLif,
    ) -> Result<SpikeBits> {
        let gather = self.conv_gather(spikes, padding, stride)?;
        let (tb, _, _, _) = gather.windows.dims;
        if steps == 0 || !tb.is_multiple_of(steps) {
            candle_core::bail!(
                "spike conv into a LIF: {tb} images are not {steps} steps of a batch"
            )
        }
        let (ho, wo) = gather.windows.out_hw;
        let rows = vec![steps, tb / steps, ho, wo];
        self.fired(&gather, lif, (steps, 1), rows)
    }

    /// The gather of the convolution of channels-last spikes `[B, H, W, C]`.
    fn conv_gather<'a>(
        &'a self,
        spikes: &'a SpikeBits,
        padding: usize,
        stride: usize,
    ) -> Result<Gather<'a>> {
        let (b, h, w, c) = spikes.dims4("spike_conv2d")?;
        let (kh, kw) = self.kernel;
        if kh * kw * c != self.weights.inputs {
            candle_core::bail!(
                "spike_conv2d: spikes have {c} channels, weight expects {}",
                self.weights.inputs / (kh * kw)
            )
        }
        let win = Window {
            kh,
            kw,
            padding,
            stride,
        };
        Ok(Gather {
            windows: Windows {
                spikes,
                dims: (b, h, w, c),
                win,
                out_hw: win.out_size(h, w)?,
            },
            weights: &self.weights,
            schedule: LAYER,
        })
    }
}

/// Spike-driven linear layer: `spikes [..., K] x weight [O, K]^T -> [..., O]`, adds only.
pub fn spike_linear(spikes: &SpikeBits, weight: &Tensor) -> Result<Tensor> {
    weight.dims2()?;
    SpikeLayer::new(weight, None)?.linear(spikes, weight.device())
}

/// Spike-driven convolution of channels-last spikes `[B, H, W, C]` with
/// `weight [O, C, kh, kw]`: `[B, O, Ho, Wo]`, see [`SpikeLayer::conv2d`].
pub fn spike_conv2d(
    spikes: &SpikeBits,
    weight: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    weight.dims4()?;
    SpikeLayer::new(weight, None)?.conv2d(spikes, padding, stride, weight.device())
}

/// A linear layer's output `[M, O]` on spikes `[M, K]`, its weights laid out for the
/// accumulate-only kernel a slice of `outputs` outputs at a time (`slice(range)` gives a slice's
/// layer), the rows each output row sums chosen once for all slices: for the text encoder's
/// first layer, chosen 32 times over, the choosing took as long as the sums. Every value is
/// the one the whole layer would compute.
pub(in crate::kernels) fn sparse_linear_sliced(
    spikes: &SpikeBits,
    o: usize,
    outputs: usize,
    mut slice: impl FnMut(Range<usize>) -> Result<SpikeLayer>,
) -> Result<Vec<f32>> {
    let level = simd::SPIKE_GATHER.level();
    let len = spikes.rows() * o;
    let mut out = Vec::with_capacity(len);
    let mut selections = None;
    for start in (0..o).step_by(outputs.max(1)) {
        let layer = slice(start..(start + outputs).min(o))?;
        layer.check_linear(spikes)?;
        let gather = Gather {
            windows: Windows::rows(spikes),
            weights: &layer.weights,
            schedule: LAYER,
        };
        // One slice chooses as it goes, holding a task's choice at a time.
        let shared = match outputs < o {
            true => Some(
                selections
                    .get_or_insert_with(|| gather.selections())
                    .as_slice(),
            ),
            false => None,
        };
        let at = Placement {
            stride: o,
            offset: start,
        };
        gather.run_into(level, &mut out.spare_capacity_mut()[..len], at, shared);
    }
    // SAFETY: the slices cover all `o` columns, and `run_into` wrote every value of its
    // slice's columns in every row.
    unsafe { out.set_len(len) };
    Ok(out)
}
