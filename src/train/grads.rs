//! The gradients of one backward pass: candle's `GradStore`, plus those the model's ops wrote
//! to [`GradSlot`]s for the parameters too large for candle's dense accumulation.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};

use crate::dist::grads::{all_reduce_in_buckets, union_rows};
use crate::dist::Collective;
use crate::kernels::grad_slot::{GradSlot, OuterGrad, RowGrad, SlotGrad};

/// One parameter's gradient.
#[derive(Debug, Clone, Copy)]
pub enum Grad<'a> {
    /// candle's.
    Tensor(&'a Tensor),
    /// Written by the parameter's op: every value, in the parameter's layout.
    Values(&'a [f32]),
    /// A table's gradient as the rows a lookup touched; the others are zero.
    Rows(&'a RowGrad),
    /// A linear layer's weight gradient as its factors, formed a block at a time.
    Product(&'a OuterGrad),
}

pub struct Gradients {
    store: GradStore,
    /// Each slot that was written, with what it held; the storage goes back to the slot when
    /// these gradients are dropped.
    slots: HashMap<TensorId, (GradSlot, SlotGrad)>,
}

impl Gradients {
    /// Backward from `loss`, with what the ops wrote to `slots` during this pass. Whatever the
    /// slots held before (from a backward nobody collected) is dropped first, so a parameter
    /// counts as having a gradient only if its op ran backward now.
    pub fn backward(loss: &Tensor, slots: &[GradSlot]) -> Result<Self> {
        for slot in slots {
            if let Some(stale) = slot.take()? {
                slot.recycle(stale);
            }
        }
        let store = loss.backward()?;
        let mut taken = HashMap::new();
        for slot in slots {
            if let Some(grad) = slot.take()? {
                taken.insert(slot.param(), (slot.clone(), grad));
            }
        }
        Ok(Self {
            store,
            slots: taken,
        })
    }

    /// Sums every gradient of `params` over the ranks of `c` in `params`' order (each
    /// rank's loss already weighted by its share of the global batch, so the sums are the
    /// global batch's gradients). A row gradient first takes the rows any rank touched; a
    /// factored one is formed, since the factors of different ranks do not add. Returns the
    /// bytes reduced; alone, nothing is touched.
    pub fn all_reduce(&mut self, params: &[(String, Var)], c: &dyn Collective) -> Result<usize> {
        if c.size() == 1 {
            return Ok(0);
        }
        let mut owned: HashMap<TensorId, Vec<f32>> = HashMap::new();
        for (name, var) in params {
            let p = var.as_tensor();
            let Some((_, grad)) = self.slots.get_mut(&p.id()) else {
                let g = self.store.get(p).ok_or_else(|| {
                    candle_core::Error::Msg(format!("{name} has no gradient to sum"))
                })?;
                owned.insert(p.id(), g.flatten_all()?.to_vec1::<f32>()?);
                continue;
            };
            let formed = match grad {
                SlotGrad::Product(product) => {
                    let mut dense = vec![0f32; p.elem_count()];
                    product.write_into(&mut dense)?;
                    Some(dense)
                }
                SlotGrad::Rows(rows) => {
                    let width = rows.width().max(1);
                    union_rows(rows, p.elem_count() / width, c)?;
                    None
                }
                SlotGrad::Dense(_) => None,
            };
            if let Some(dense) = formed {
                *grad = SlotGrad::Dense(dense);
            }
        }
        let mut views: HashMap<TensorId, &mut [f32]> = owned
            .iter_mut()
            .map(|(id, v)| (*id, v.as_mut_slice()))
            .collect();
        for (id, (_, grad)) in self.slots.iter_mut() {
            let values = match grad {
                SlotGrad::Dense(v) => v.as_mut_slice(),
                SlotGrad::Rows(rows) => rows.values_mut(),
                // Not one of `params` (theirs were formed above): left alone.
                SlotGrad::Product(_) => continue,
            };
            views.insert(*id, values);
        }
        let mut ordered: Vec<&mut [f32]> = params
            .iter()
            .filter_map(|(_, var)| views.remove(&var.as_tensor().id()))
            .collect();
        let bytes = all_reduce_in_buckets(&mut ordered, c);
        for (_, var) in params {
            let p = var.as_tensor();
            if let Some(values) = owned.remove(&p.id()) {
                let sum = Tensor::from_vec(values, p.shape(), p.device())?.to_dtype(p.dtype())?;
                self.store.insert(p, sum);
            }
        }
        Ok(bytes)
    }

    /// The gradient of `param`, if it got one.
    pub fn get(&self, param: &Tensor) -> Option<Grad<'_>> {
        match self.slots.get(&param.id()) {
            Some((_, SlotGrad::Dense(values))) => Some(Grad::Values(values)),
            Some((_, SlotGrad::Rows(rows))) => Some(Grad::Rows(rows)),
            Some((_, SlotGrad::Product(product))) => Some(Grad::Product(product)),
            None => self.store.get(param).map(Grad::Tensor),
        }
    }
}

impl Drop for Gradients {
    fn drop(&mut self) {
        for (_, (slot, grad)) in self.slots.drain() {
            slot.recycle(grad);
        }
    }
}

/// The gradients of a graph without slots.
impl From<GradStore> for Gradients {
    fn from(store: GradStore) -> Self {
        Self {
            store,
            slots: HashMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::embedding::token_embedding;
    use crate::kernels::grad_slot::SlotParam;
    use candle_core::{Device, Var};

    /// A slot's parameter has a gradient only if its op ran in this backward: whatever an
    /// uncollected pass left in the slot is dropped first.
    #[test]
    fn a_slot_counts_only_for_the_pass_that_wrote_it() -> Result<()> {
        let dev = Device::Cpu;
        let param = |values: &[f32]| -> Result<SlotParam> {
            let t = Tensor::new(values, &dev)?.reshape(((), 2))?;
            Ok(SlotParam::new(Var::from_tensor(&t)?.as_tensor().clone()))
        };
        let (token, position) = (param(&[1., 2., 3., 4.])?, param(&[0.5, 0.5])?);
        let other = Var::new(&[3f32], &dev)?;
        let slots = [token.grad().clone(), position.grad().clone()];
        let ids = Tensor::new(&[[1u32]], &dev)?;
        // A pass nobody collected, then one that does not reach the tables.
        token_embedding(&ids, &token, &position)?
            .sum_all()?
            .backward()?;
        let loss = other.as_tensor().sqr()?.sum_all()?;
        let grads = Gradients::backward(&loss, &slots)?;
        assert!(grads.get(token.value()).is_none());
        assert!(grads.get(position.value()).is_none());
        assert!(matches!(
            grads.get(other.as_tensor()),
            Some(Grad::Tensor(_))
        ));
        drop(grads);
        let loss = (token_embedding(&ids, &token, &position)?.sum_all()? + loss)?;
        let grads = Gradients::backward(&loss, &slots)?;
        let Some(Grad::Rows(rows)) = grads.get(token.value()) else {
            panic!("no row gradient")
        };
        assert_eq!(
            (rows.rows(), rows.row(1)),
            (&[1][..], Some(&[1f32, 1.][..]))
        );
        assert!(matches!(
            grads.get(position.value()),
            Some(Grad::Values([1., 1.]))
        ));
        assert!(grads.get(other.as_tensor()).is_some());
        Ok(())
    }
}
