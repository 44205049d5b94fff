//! Hand-written CPU kernels for the hot paths candle leaves slow: convolution as im2col +
//! matmul (candle's own conv2d backward goes through conv_transpose2d at a few GFLOP/s) and
//! accumulate-only kernels over bit-packed spikes, which turn spike sparsity into wall-clock time.

pub mod attention;
pub mod batch_norm;
pub mod batched;
pub(crate) mod buffer;
mod columns;
pub mod conv;
pub mod embedding;
pub mod grad_slot;
pub mod layout;
pub mod lif_linear;
mod linear_blocks;
pub mod maxpool;
pub mod simd;
pub mod spike_grad;
pub mod spikes;
pub mod text_mlp;

use std::cell::Cell;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, InplaceOp1, Layout, Result, Shape, Storage, Tensor,
};

/// The f32 data of a contiguous CPU tensor; our kernels index it directly.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected an f32 tensor, got {:?}", storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((lo, hi)) => Ok(&data[lo..hi]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// `f` on the f32 data of `t`, a CPU tensor, in place (made contiguous first if it is not).
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = layout::contiguous(t)?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(contiguous_f32(s, layout, op)?),
        _ => candle_core::bail!("{op}: expected a CPU tensor"),
    }
}

/// `f` on the f32 data of `t`, a contiguous CPU tensor, writable: `t`'s own storage, changed in
/// place for every tensor that shares it (an optimiser updating a parameter without a copy).
pub(crate) fn with_f32_mut(
    t: &Tensor,
    op: &'static str,
    f: impl FnOnce(&mut [f32]) -> Result<()>,
) -> Result<()> {
    /// Hands candle's in-place op its closure, which runs once.
    struct InPlace<F> {
        op: &'static str,
        f: Cell<Option<F>>,
    }
    impl<F: FnOnce(&mut [f32]) -> Result<()>> InplaceOp1 for InPlace<F> {
        fn name(&self) -> &'static str {
            self.op
        }
        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
            let CpuStorage::F32(data) = storage else {
                candle_core::bail!(
                    "{}: expected an f32 tensor, got {:?}",
                    self.op,
                    storage.dtype()
                )
            };
            let Some((lo, hi)) = layout.contiguous_offsets() else {
                candle_core::bail!("{}: expected a contiguous tensor", self.op)
            };
            match self.f.take() {
                Some(f) => f(&mut data[lo..hi]),
                None => candle_core::bail!("{}: run twice", self.op),
            }
        }
    }
    if !t.device().is_cpu() {
        candle_core::bail!("{op}: expected a CPU tensor")
    }
    t.inplace_op1(&InPlace {
        op,
        f: Cell::new(Some(f)),
    })
}

/// An op whose result was computed before it ran, with candle's own ops on detached tensors, and
/// whose gradients `bwd` gives. A fused op written this way reads its inputs in place (a
/// `cpu_fwd` gets raw storage, and would have to copy it into tensors to use candle's matmul),
/// and autograd keeps nothing for it but its arguments and what `bwd` captures. `cpu_fwd` hands
/// the result over, at the cost of one copy of it.
struct Precomputed<B> {
    name: &'static str,
    value: Mutex<Option<Tensor>>,
    bwd: B,
}

/// Gradients of a three-argument op, as [`CustomOp3::bwd`] returns them.
pub(crate) type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl<B> Precomputed<B> {
    fn new(name: &'static str, value: Tensor, bwd: B) -> Self {
        Self {
            name,
            value: Mutex::new(Some(value)),
            bwd,
        }
    }

    /// The result, once.
    fn take(&self) -> Result<(CpuStorage, Shape)> {
        let value = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: result poisoned", self.name)))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: run twice", self.name)))?;
        let data = with_f32(&value, self.name, |v| Ok(buffer::copied(v)))?;
        Ok((CpuStorage::F32(data), value.shape().clone()))
    }
}

impl<B> CustomOp1 for Precomputed<B>
where
    B: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.take()
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.bwd)(arg, grad).map(Some)
    }
}

impl<B> CustomOp3 for Precomputed<B>
where
    B: Fn([&Tensor; 3], &Tensor) -> Result<Grads3> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.take()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<Grads3> {
        (self.bwd)([a, b, c], grad)
    }
}

/// `value`, computed from `arg` without autograd, as the result of an op named `name` on `arg`
/// whose gradient is `bwd(arg, grad)`; `value` itself when `arg` needs no gradient.
fn with_backward<B>(name: &'static str, arg: &Tensor, value: Tensor, bwd: B) -> Result<Tensor>
where
    B: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    if !arg.track_op() {
        return Ok(value);
    }
    arg.apply_op1(Precomputed::new(name, value, bwd))
}

/// [`with_backward`] for an op of three arguments.
fn with_backward3<B>(
    name: &'static str,
    args: [&Tensor; 3],
    value: Tensor,
    bwd: B,
) -> Result<Tensor>
where
    B: Fn([&Tensor; 3], &Tensor) -> Result<Grads3> + Send + Sync + 'static,
{
    if !args.iter().any(|a| a.track_op()) {
        return Ok(value);
    }
    args[0].apply_op3(args[1], args[2], Precomputed::new(name, value, bwd))
}

/// Comparisons shared by the kernels' tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Tensor, Var};

    /// Largest absolute difference relative to the largest magnitude of `b`.
    pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-12)
    }

    /// `ours` and `theirs` give the same gradients, within `tol` relative, to every var in
    /// `vars` under the same random upstream gradient.
    pub fn assert_same_gradients(ours: Tensor, theirs: Tensor, vars: &[&Var], tol: f32) {
        let pairs: Vec<_> = vars
            .iter()
            .map(|v| (v.as_tensor().clone(), v.as_tensor().clone()))
            .collect();
        assert_paired_gradients(ours, theirs, &pairs, tol)
    }

    /// [`assert_same_gradients`] for two graphs with leaves of their own: each pair holds a
    /// tensor of `ours`'s graph and its counterpart in `theirs`'s.
    pub fn assert_paired_gradients(
        ours: Tensor,
        theirs: Tensor,
        pairs: &[(Tensor, Tensor)],
        tol: f32,
    ) {
        let g = Tensor::randn(0f32, 1.0, theirs.dims(), theirs.device()).unwrap();
        let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (theirs * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (a, b) in pairs {
            let (da, db) = (ga.get(a).unwrap(), gb.get(b).unwrap());
            assert!(
                max_rel_diff(da, db) < tol,
                "gradient differs for {:?}",
                a.dims()
            );
        }
    }
}
