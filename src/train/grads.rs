//! The gradients of one backward pass: candle's `GradStore`, plus those the model's ops wrote
//! to [`GradSlot`]s for the parameters too large for candle's dense accumulation.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId};

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
