//! Gradients that an op writes for a parameter it was handed, instead of returning them to
//! candle's `GradStore`, like PyTorch's `.grad`.
//!
//! candle's backward accumulates every gradient as `zeros_like(param) + grad`: a parameter's
//! gradient costs three times its size at the moment it lands, and a table read by a lookup gets
//! a dense gradient though a batch touches a few of its rows. For the text encoder's token table
//! (49408 x 512, 97 MiB) and first weight (80 MiB) that is most of a training step's peak
//! memory. An op given a [`GradSlot`] writes the gradient it computes as it is, in the form that
//! suits it: dense values, the summed rows a lookup touched ([`RowGrad`]), or a linear layer's
//! weight gradient as its two factors ([`OuterGrad`]). It returns none to candle for that
//! argument, which still takes part in the graph, so backward reaches the op. Dense and row
//! storage comes back to its slot once the step's gradients are dropped, for the next step.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{Result, Tensor, TensorId};

use super::linear_blocks::{
    block_width, column_blocks, product_block, weight_gradient_into, BLOCK_FLOATS,
};
use super::spikes::SpikeBits;
use super::with_f32;

/// The rows of a table's gradient that a lookup touched, summed per row; every other row's
/// gradient is zero.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowGrad {
    /// Row ids, ascending, each once.
    rows: Vec<u32>,
    /// `[rows.len(), width]`, row-major.
    values: Vec<f32>,
    width: usize,
}

impl RowGrad {
    /// Adds the gradient `grad [ids.len(), width]` of the rows `ids` (repeats allowed). Each
    /// row sums its occurrences in their order, from zero, as candle's dense `index_add` does,
    /// so the sums are bit for bit the dense gradient's rows.
    pub fn add(&mut self, ids: &[u32], grad: &[f32], width: usize) -> Result<()> {
        if grad.len() != ids.len() * width {
            candle_core::bail!(
                "row gradient: {} values for {} rows of {width}",
                grad.len(),
                ids.len()
            )
        }
        self.include(ids, width)?;
        for (id, g) in ids.iter().zip(grad.chunks_exact(width)) {
            let at = self.rows.binary_search(id).expect("every id was added");
            for (sum, g) in self.values[at * width..(at + 1) * width].iter_mut().zip(g) {
                *sum += g;
            }
        }
        Ok(())
    }

    /// Makes the rows `ids` present, zero where new, so that adding to them later moves no
    /// values.
    pub fn include(&mut self, ids: &[u32], width: usize) -> Result<()> {
        if !self.rows.is_empty() && width != self.width {
            candle_core::bail!(
                "row gradient: rows of {width} added to rows of {}",
                self.width
            )
        }
        self.width = width;
        if ids.iter().all(|id| self.rows.binary_search(id).is_ok()) {
            return Ok(());
        }
        if self.rows.is_empty() {
            // A new gradient, or one emptied for reuse: its buffers are filled in place.
            self.rows.extend_from_slice(ids);
            self.rows.sort_unstable();
            self.rows.dedup();
            self.values.clear();
            self.values.resize(self.rows.len() * width, 0.0);
            return Ok(());
        }
        let mut rows: Vec<u32> = self.rows.iter().chain(ids).copied().collect();
        rows.sort_unstable();
        rows.dedup();
        let mut values = vec![0f32; rows.len() * width];
        for (id, old) in self.rows.iter().zip(self.values.chunks_exact(width)) {
            let at = rows.binary_search(id).expect("old rows are kept");
            values[at * width..(at + 1) * width].copy_from_slice(old);
        }
        (self.rows, self.values) = (rows, values);
        Ok(())
    }

    /// Columns per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The ids of the rows with a gradient, ascending.
    pub fn rows(&self) -> &[u32] {
        &self.rows
    }

    /// The rows' values, `[rows().len(), width()]` row-major, for summing them across
    /// processes in place ([`crate::dist::grads::union_rows`] lines the rows up first).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Row `id`'s gradient, or `None` where it is zero.
    pub fn row(&self, id: usize) -> Option<&[f32]> {
        let at = self.rows.binary_search(&u32::try_from(id).ok()?).ok()?;
        Some(&self.values[at * self.width..(at + 1) * self.width])
    }
}

/// A linear layer's weight gradient `grad^T . spikes` `[O, K]` kept as its factors, the
/// output gradient `grad [M, O]` and the input spikes `[M, K]` as bits, and formed a block of
/// columns at a time by whoever reads it. For the text encoder's first layer the factors take
/// 9 MiB, the gradient 80; the blocks hold the values the whole product does.
#[derive(Debug, Clone)]
pub struct OuterGrad {
    grad: Tensor,
    spikes: Arc<SpikeBits>,
    width: usize,
}

impl OuterGrad {
    pub(crate) fn new(grad: &Tensor, spikes: Arc<SpikeBits>) -> Result<Self> {
        let (m, o) = grad.dims2()?;
        if spikes.rows() != m {
            candle_core::bail!(
                "lif_linear: {m} rows of output gradients for {} of spikes",
                spikes.rows()
            )
        }
        Ok(Self {
            grad: grad.contiguous()?,
            width: block_width(o, BLOCK_FLOATS),
            spikes,
        })
    }

    /// `[O, K]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.grad.dims()[1], self.spikes.cols())
    }

    /// Calls `f(cols, block)` for consecutive blocks of the gradient's columns, `block` being
    /// those columns, `[O, cols.len()]` row-major.
    pub fn for_each_block(
        &self,
        mut f: impl FnMut(Range<usize>, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let (o, k) = self.dims();
        let mut block = vec![0f32; o * self.width.min(k)];
        with_f32(&self.grad, "lif_linear", |g| {
            for cols in column_blocks(k, self.width) {
                let values = &mut block[..o * cols.len()];
                product_block((values, cols.len()), (g, o), &self.spikes, cols.clone())?;
                f(cols, values)?;
            }
            Ok(())
        })
    }

    /// Every value, `[O, K]` row-major, into `out`.
    pub fn write_into(&self, out: &mut [f32]) -> Result<()> {
        weight_gradient_into(out, &self.grad, &self.spikes, self.width)
    }
}

/// A gradient as a [`GradSlot`] holds it.
#[derive(Debug, Clone)]
pub enum SlotGrad {
    /// Every value, in the parameter's layout.
    Dense(Vec<f32>),
    Rows(RowGrad),
    Product(OuterGrad),
}

/// What a slot holds: this pass's gradient, if an op wrote one, and the storage of an earlier
/// step's to write the next one into.
#[derive(Debug, Default)]
struct Held {
    grad: Option<SlotGrad>,
    spare: Option<SlotGrad>,
}

/// Where the ops that use a parameter write its gradient during backward, until
/// [`crate::train::grads::Gradients`] takes it. Clones share the slot.
#[derive(Debug, Clone)]
pub struct GradSlot(Arc<Slot>);

#[derive(Debug)]
struct Slot {
    param: TensorId,
    /// The parameter's values.
    len: usize,
    held: Mutex<Held>,
}

impl GradSlot {
    /// An empty slot for the gradient of `param`.
    pub fn new(param: &Tensor) -> Self {
        Self(Arc::new(Slot {
            param: param.id(),
            len: param.elem_count(),
            held: Mutex::default(),
        }))
    }

    /// The parameter whose gradient this is.
    pub fn param(&self) -> TensorId {
        self.0.param
    }

    fn lock(&self) -> Result<MutexGuard<'_, Held>> {
        self.0
            .held
            .lock()
            .map_err(|_| candle_core::Error::Msg("gradient slot poisoned".into()))
    }

    /// Adds a dense gradient that `fill` writes, every value of it, into the buffer it is
    /// given: the slot's spare one when this is the pass's first gradient, else a new one whose
    /// values are then added to the first's, as candle sums a parameter's gradients.
    pub fn fill_dense(&self, fill: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
        let len = self.0.len;
        let mut held = self.lock()?;
        let Held { grad, spare } = &mut *held;
        match grad {
            None => {
                let mut buffer = match spare.take() {
                    Some(SlotGrad::Dense(spare)) if spare.len() == len => spare,
                    _ => vec![0f32; len],
                };
                fill(&mut buffer)?;
                *grad = Some(SlotGrad::Dense(buffer));
            }
            Some(SlotGrad::Dense(sum)) => add_filled(sum, fill)?,
            Some(SlotGrad::Product(first)) => {
                let mut sum = vec![0f32; len];
                first.write_into(&mut sum)?;
                add_filled(&mut sum, fill)?;
                *grad = Some(SlotGrad::Dense(sum));
            }
            Some(SlotGrad::Rows(_)) => {
                candle_core::bail!("gradient slot: a dense gradient added to a row gradient")
            }
        }
        Ok(())
    }

    /// Sets this pass's gradient to the product `grad^T . spikes` (see [`OuterGrad`]), kept as
    /// its factors; after another gradient of this pass it is formed and added.
    pub fn add_product(&self, grad: &Tensor, spikes: Arc<SpikeBits>) -> Result<()> {
        let product = OuterGrad::new(grad, spikes)?;
        let mut held = self.lock()?;
        if held.grad.is_none() {
            held.grad = Some(SlotGrad::Product(product));
            return Ok(());
        }
        drop(held);
        self.fill_dense(|out| product.write_into(out))
    }

    /// Adds a dense gradient given as a tensor of the parameter's size.
    pub fn add_tensor(&self, grad: &Tensor) -> Result<()> {
        with_f32(grad, "gradient slot", |g| {
            self.fill_dense(|out| {
                if g.len() != out.len() {
                    candle_core::bail!(
                        "gradient slot: {} values for a parameter of {}",
                        g.len(),
                        out.len()
                    )
                }
                out.copy_from_slice(g);
                Ok(())
            })
        })
    }

    /// Adds the gradient of the rows `ids` of a table, see [`RowGrad::add`].
    pub fn add_rows(&self, ids: &[u32], grad: &[f32], width: usize) -> Result<()> {
        self.with_rows(|rows| rows.add(ids, grad, width))
    }

    /// Makes the rows `ids` of a table's gradient present, see [`RowGrad::include`]: for an op
    /// that adds its rows in parts.
    pub fn include_rows(&self, ids: &[u32], width: usize) -> Result<()> {
        self.with_rows(|rows| rows.include(ids, width))
    }

    fn with_rows(&self, f: impl FnOnce(&mut RowGrad) -> Result<()>) -> Result<()> {
        let mut held = self.lock()?;
        let Held { grad, spare } = &mut *held;
        let fresh = || match spare.take() {
            Some(SlotGrad::Rows(mut rows)) => {
                rows.rows.clear();
                SlotGrad::Rows(rows)
            }
            _ => SlotGrad::Rows(RowGrad::default()),
        };
        match grad.get_or_insert_with(fresh) {
            SlotGrad::Rows(rows) => f(rows),
            SlotGrad::Dense(_) | SlotGrad::Product(_) => {
                candle_core::bail!("gradient slot: a row gradient added to a dense gradient")
            }
        }
    }

    /// The gradient written since the last take, if any op wrote one; the slot is left empty.
    pub fn take(&self) -> Result<Option<SlotGrad>> {
        Ok(self.lock()?.grad.take())
    }

    /// Gives a taken gradient's storage back, for the next pass to write into (a product's
    /// factors are not reused).
    pub fn recycle(&self, grad: SlotGrad) {
        if let (false, Ok(mut held)) = (matches!(grad, SlotGrad::Product(_)), self.lock()) {
            held.spare = Some(grad);
        }
    }
}

/// Adds to `sum` the values `fill` writes into a buffer of its size, as candle sums a
/// parameter's gradients.
fn add_filled(sum: &mut [f32], fill: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
    let mut more = vec![0f32; sum.len()];
    fill(&mut more)?;
    for (s, m) in sum.iter_mut().zip(&more) {
        *s += m;
    }
    Ok(())
}

/// A parameter and the slot the ops that use it write its gradient to.
#[derive(Debug, Clone)]
pub struct SlotParam {
    value: Tensor,
    grad: GradSlot,
}

impl SlotParam {
    pub fn new(value: Tensor) -> Self {
        Self {
            grad: GradSlot::new(&value),
            value,
        }
    }

    pub fn value(&self) -> &Tensor {
        &self.value
    }

    pub fn grad(&self) -> &GradSlot {
        &self.grad
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn rows_sum_their_occurrences_like_a_dense_index_add() -> Result<()> {
        let dev = Device::Cpu;
        let width = 3;
        let ids = [4u32, 1, 4, 7, 1, 4];
        let grad: Vec<f32> = (0..ids.len() * width)
            .map(|i| 0.1 * i as f32 - 0.7)
            .collect();
        let more_ids = [7u32, 0];
        let more: Vec<f32> = (0..more_ids.len() * width)
            .map(|i| 0.3 * i as f32)
            .collect();
        let mut sparse = RowGrad::default();
        sparse.add(&ids, &grad, width)?;
        sparse.add(&more_ids, &more, width)?;
        let dense = Tensor::zeros((9, width), candle_core::DType::F32, &dev)?
            .index_add(
                &Tensor::new(&ids, &dev)?,
                &Tensor::from_vec(grad, (ids.len(), width), &dev)?,
                0,
            )?
            .index_add(
                &Tensor::new(&more_ids, &dev)?,
                &Tensor::from_vec(more, (more_ids.len(), width), &dev)?,
                0,
            )?;
        assert_eq!(sparse.rows(), &[0, 1, 4, 7]);
        for (id, row) in dense.to_vec2::<f32>()?.iter().enumerate() {
            match sparse.row(id) {
                Some(g) => assert_eq!(g, row.as_slice(), "row {id}"),
                None => assert!(row.iter().all(|&v| v == 0.0), "row {id}"),
            }
        }
        Ok(())
    }

    /// Sets `out` to `values`.
    fn write(values: &[f32]) -> impl FnOnce(&mut [f32]) -> Result<()> + '_ {
        |out| {
            out.copy_from_slice(values);
            Ok(())
        }
    }

    /// The values of a dense gradient, or a panic naming what the slot held instead.
    fn dense(grad: Option<SlotGrad>) -> Vec<f32> {
        match grad {
            Some(SlotGrad::Dense(values)) => values,
            other => panic!("expected a dense gradient, got {other:?}"),
        }
    }

    #[test]
    fn a_slot_accumulates_until_taken_reuses_its_buffer_and_refuses_mixed_kinds() -> Result<()> {
        let param = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu)?;
        let slot = GradSlot::new(&param);
        assert_eq!(slot.param(), param.id());
        assert!(slot.take()?.is_none());
        slot.fill_dense(write(&[1.0, 2.0]))?;
        slot.clone().fill_dense(write(&[0.5, 1.0]))?;
        assert!(slot.add_rows(&[0], &[1.0, 2.0], 2).is_err());
        let values = dense(slot.take()?);
        assert_eq!(values, [1.5, 3.0]);
        assert!(slot.take()?.is_none());
        let kept = values.as_ptr();
        slot.recycle(SlotGrad::Dense(values));
        slot.fill_dense(|out| {
            assert_eq!(out.as_ptr(), kept, "the spare buffer is written into");
            out.fill(4.0);
            Ok(())
        })?;
        assert_eq!(dense(slot.take()?), [4.0, 4.0]);
        slot.add_rows(&[1], &[1.0, 2.0], 2)?;
        assert!(slot.add_rows(&[1], &[1.0, 2.0, 3.0], 3).is_err());
        assert!(slot.add_rows(&[1], &[1.0], 2).is_err());
        assert!(slot.fill_dense(write(&[0.0, 0.0])).is_err());
        Ok(())
    }

    /// A product gradient's blocks and values are `grad^T . spikes` as candle's matmul gives
    /// it, also for more columns than a block; a second gradient of the pass is added to it.
    #[test]
    fn a_product_is_formed_block_by_block_and_accumulates() -> Result<()> {
        let dev = Device::Cpu;
        let (m, o, k) = (6, 3, BLOCK_FLOATS / 3 + 70);
        let grad = Tensor::randn(0f32, 1.0, (m, o), &dev)?;
        let spikes = Tensor::randn(0f32, 1.0, (m, k), &dev)?
            .ge(0.5)?
            .to_dtype(DType::F32)?;
        let bits = Arc::new(SpikeBits::pack(&spikes)?);
        let want = grad.t()?.matmul(&spikes)?.to_vec2::<f32>()?;
        let product = OuterGrad::new(&grad, bits.clone())?;
        assert_eq!(product.dims(), (o, k));
        let mut blocks = Vec::new();
        product.for_each_block(|cols, block| {
            for (row, values) in block.chunks_exact(cols.len()).enumerate() {
                assert_eq!(values, &want[row][cols.clone()], "columns {cols:?}");
            }
            blocks.push(cols);
            Ok(())
        })?;
        assert!(blocks.len() > 1 && blocks.last().map(|b| b.end) == Some(k));
        let mut formed = vec![0f32; o * k];
        product.write_into(&mut formed)?;
        assert_eq!(formed, want.concat());

        let weight = Tensor::zeros((o, k), DType::F32, &dev)?;
        let slot = GradSlot::new(&weight);
        slot.add_product(&grad, bits.clone())?;
        assert!(matches!(slot.take()?, Some(SlotGrad::Product(_))));
        slot.add_product(&grad, bits.clone())?;
        slot.add_product(&grad, bits)?;
        let twice: Vec<f32> = want.concat().iter().map(|v| v + v).collect();
        assert_eq!(dense(slot.take()?), twice);
        assert!(
            OuterGrad::new(&grad.narrow(0, 0, 2)?, Arc::new(SpikeBits::pack(&spikes)?)).is_err()
        );
        Ok(())
    }
}
