//! Token plus position embedding of a token window as one op whose token-table gradient is the
//! rows the batch used.
//!
//! Composed from candle's `index_select` and a broadcast add, backward gives the token table
//! (CLIP's, 49408 x 512, 97 MiB) a dense gradient built as zeros plus an `index_add`: two
//! table-sized buffers for a batch that touches a few thousand rows, and an optimiser that then
//! reads all of them. This op writes the touched rows, summed, to the table's slot.

use candle_core::{DType, Result, Tensor};

use super::grad_slot::SlotParam;
use super::{with_backward3, with_f32};

/// The token ids `[B, L]` of a batch, checked against the vocabulary, on the host: what the
/// embedding's forward reads and its backward scatters to.
pub(crate) struct Tokens {
    ids: Vec<u32>,
    len: usize,
}

impl Tokens {
    /// `ids [B, L]` for a table of `vocab` rows.
    pub(crate) fn new(ids: &Tensor, vocab: usize) -> Result<Self> {
        let (_, len) = ids.dims2()?;
        // Negative ids wrap to huge ones here and are refused with the others.
        let ids: Vec<u32> = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            candle_core::bail!(
                "token embedding: token id {bad} is outside the vocabulary of {vocab}"
            )
        }
        Ok(Self { ids, len })
    }

    /// Sentences in the batch.
    pub(crate) fn batch(&self) -> usize {
        self.ids.len() / self.len.max(1)
    }

    /// Tokens per sentence.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Every id, sentence after sentence.
    pub(crate) fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The ids at position `l` of every sentence.
    pub(crate) fn at(&self, l: usize) -> Vec<u32> {
        self.ids
            .iter()
            .skip(l)
            .step_by(self.len.max(1))
            .copied()
            .collect()
    }

    /// `table[id] + position[p]` for each `(id, p)` of `rows`, a table `[V, W]` and positions
    /// `[P >= L, W]`: `[rows, W]` values.
    fn gather(
        &self,
        (table, position): (&Tensor, &Tensor),
        rows: impl ExactSizeIterator<Item = (u32, usize)>,
    ) -> Result<Vec<f32>> {
        let (l, w) = (self.len, table.dim(1)?);
        let (positions, position_width) = position.dims2()?;
        if position_width != w || positions < l {
            candle_core::bail!(
                "token embedding: positions {:?} for {l} tokens of width {w}",
                position.dims()
            )
        }
        with_f32(table, "token embedding", |table| {
            with_f32(position, "token embedding", |position| {
                let mut out = vec![0f32; rows.len() * w];
                for (row, (id, p)) in out.chunks_exact_mut(w).zip(rows) {
                    let token = &table[id as usize * w..(id as usize + 1) * w];
                    let pos = &position[p * w..(p + 1) * w];
                    for ((o, t), p) in row.iter_mut().zip(token).zip(pos) {
                        *o = t + p;
                    }
                }
                Ok(out)
            })
        })
    }

    /// `table[ids] + position[..L]` for a table `[V, W]` and positions `[P >= L, W]`: `[B, L,
    /// W]`, the values of `index_select` plus a broadcast add.
    pub(crate) fn embed(&self, table: &Tensor, position: &Tensor) -> Result<Tensor> {
        let l = self.len.max(1);
        let rows = self.ids.iter().enumerate().map(|(i, &id)| (id, i % l));
        let values = self.gather((table, position), rows)?;
        let shape = (self.batch(), self.len, table.dim(1)?);
        Tensor::from_vec(values, shape, table.device())
    }

    /// The embedding of position `l` of every sentence alone, `[B, W]`.
    pub(crate) fn embed_at(&self, l: usize, table: &Tensor, position: &Tensor) -> Result<Tensor> {
        let rows = self.at(l).into_iter().map(|id| (id, l));
        let values = self.gather((table, position), rows)?;
        Tensor::from_vec(values, (self.batch(), table.dim(1)?), table.device())
    }

    /// Writes the gradients of [`Self::embed`] given that of its value (`[B, L, W]` values in
    /// any shape): the table's as the summed rows of the ids, the positions' as the sum over
    /// the batch. Both are summed in candle's order, so they equal the composed op's bit for
    /// bit.
    pub(crate) fn backward(
        &self,
        grad: &Tensor,
        (token, position): (&SlotParam, &SlotParam),
    ) -> Result<()> {
        let w = token.value().dim(1)?;
        let window = self.len * w;
        with_f32(grad, "token embedding", |g| {
            if g.len() != self.ids.len() * w {
                candle_core::bail!(
                    "token embedding: a gradient of {} values for {} tokens of width {w}",
                    g.len(),
                    self.ids.len()
                )
            }
            token.grad().add_rows(&self.ids, g, w)?;
            position.grad().fill_dense(|out| {
                out.fill(0.0);
                for sentence in g.chunks_exact(window.max(1)) {
                    for (o, g) in out.iter_mut().zip(sentence) {
                        *o += g;
                    }
                }
                Ok(())
            })
        })
    }

    /// Adds the gradient `[B, W]` of [`Self::embed_at`] for position `l`: to the token table's
    /// slot as rows, and to `positions` (the position table's gradient, `[P, W]` values) as the
    /// sum over the batch, in candle's order. A table row used at several positions sums its
    /// gradients position by position, not sentence by sentence as [`Self::backward`] does.
    pub(crate) fn backward_at(
        &self,
        l: usize,
        grad: &Tensor,
        token: &SlotParam,
        positions: &mut [f32],
    ) -> Result<()> {
        let w = token.value().dim(1)?;
        let row = positions
            .get_mut(l * w..(l + 1) * w)
            .ok_or_else(|| candle_core::Error::Msg(format!("token embedding: no position {l}")))?;
        with_f32(grad, "token embedding", |g| {
            token.grad().add_rows(&self.at(l), g, w)?;
            for sentence in g.chunks_exact(w.max(1)) {
                for (p, g) in row.iter_mut().zip(sentence) {
                    *p += g;
                }
            }
            Ok(())
        })
    }
}

/// `token[ids] + position[..L]` for token ids `[B, L]`, a table `[V, W]` and positions `[P >=
/// L, W]`: `[B, L, W]`, with the values of `index_select` plus a broadcast add. Backward writes
/// both tables' gradients to their slots, bit for bit the composed op's: the token table's as
/// the summed rows of the ids, the positions' as the sum over the batch.
pub fn token_embedding(ids: &Tensor, token: &SlotParam, position: &SlotParam) -> Result<Tensor> {
    let tokens = Tokens::new(ids, token.value().dim(0)?)?;
    let value = tokens.embed(token.value(), position.value())?;
    let params = (token.clone(), position.clone());
    with_backward3(
        "token-embedding",
        [token.value(), position.value(), ids],
        value,
        move |_, grad| {
            tokens.backward(&grad.contiguous()?, (&params.0, &params.1))?;
            Ok((None, None, None))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::grad_slot::SlotGrad;
    use candle_core::{Device, Var};

    /// Values and both tables' gradients equal candle's composition exactly, with repeated and
    /// unused ids.
    #[test]
    fn matches_index_select_and_broadcast_add_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let token = SlotParam::new(Var::randn(0f32, 1.0, (11, 6), &dev)?.as_tensor().clone());
        let position = SlotParam::new(Var::randn(0f32, 1.0, (5, 6), &dev)?.as_tensor().clone());
        let ids = Tensor::new(&[[3u32, 7, 3], [0, 3, 9]], &dev)?;
        let ours = token_embedding(&ids, &token, &position)?;
        let theirs = token
            .value()
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((2, 3, 6))?
            .broadcast_add(&position.value().narrow(0, 0, 3)?)?;
        assert_eq!(ours.to_vec3::<f32>()?, theirs.to_vec3::<f32>()?);
        let g = Tensor::randn(0f32, 1.0, (2, 3, 6), &dev)?;
        let ours_grads = (ours * &g)?.sum_all()?.backward()?;
        let theirs_grads = (theirs * &g)?.sum_all()?.backward()?;
        assert!(ours_grads.get(token.value()).is_none());
        assert!(ours_grads.get(position.value()).is_none());
        let dense = |t: &Tensor| theirs_grads.get(t).unwrap().to_vec2::<f32>();
        let Some(SlotGrad::Dense(positions)) = position.grad().take()? else {
            panic!("no position gradient")
        };
        assert_eq!(positions, dense(position.value())?.concat());
        let Some(SlotGrad::Rows(rows)) = token.grad().take()? else {
            panic!("no row gradient")
        };
        assert_eq!(rows.rows(), &[0, 3, 7, 9]);
        for (id, row) in dense(token.value())?.iter().enumerate() {
            assert_eq!(
                rows.row(id).unwrap_or(&[0.0; 6]),
                row.as_slice(),
                "row {id}"
            );
        }
        Ok(())
    }

    #[test]
    fn refuses_ids_outside_the_vocabulary_and_short_position_tables() -> Result<()> {
        let dev = Device::Cpu;
        let token = SlotParam::new(Tensor::zeros((4, 2), DType::F32, &dev)?);
        let position = SlotParam::new(Tensor::zeros((3, 2), DType::F32, &dev)?);
        let err =
            token_embedding(&Tensor::new(&[[1u32, 4]], &dev)?, &token, &position).unwrap_err();
        assert!(err.to_string().contains("token id 4"), "{err}");
        let long = Tensor::new(&[[1u32, 2, 3, 0]], &dev)?;
        assert!(token_embedding(&long, &token, &position).is_err());
        Ok(())
    }
}
