//! Bit-packed spikes and accumulate-only inference kernels over them.
//!
//! After every LIF the data are 0/1, so a layer fed by spikes needs no multiplications: a linear
//! layer or convolution is the sum of the weight rows its active inputs select, and q . k^T
//! between two spike tensors is a popcount of ANDed words. Work then scales with the firing
//! rate instead of the layer size, which is what turns sparsity into wall-clock time.

mod attention;
mod bits;
mod gather;
mod layer;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use attention::{spike_attention, spike_attention_scores};
pub(in crate::kernels) use bits::for_each_active;
pub use bits::SpikeBits;
pub(crate) use bits::{pack_binary_row, WORD_BITS};
pub(crate) use gather::BLOCK;
pub(in crate::kernels) use gather::{BlockedWeights, Gather, Schedule, Windows};
pub(in crate::kernels) use layer::sparse_linear_sliced;
pub use layer::{spike_conv2d, spike_linear, SpikeLayer};
