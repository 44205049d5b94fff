//! SpikeCLIP's text MLP as one op: the token and position embedding of a token window, held as
//! the input of all T steps (direct encoding, as the authors' repeat over T), then LIF ->
//! linear -> LIF -> linear.
//!
//! Composed from single ops, candle's autograd keeps every layer's input until backward and
//! builds each intermediate's gradient as zeros plus the gradient: for a batch of 256 sentences
//! the embedding (10 MiB) and the hidden layer (8 MiB) three and four times over, while the
//! largest weights' gradients are live. As one op, backward keeps the hidden layer's input
//! alone, runs the first layer's input gradient a token position at a time (its embedding
//! block recomputed from the ids, its gradient block added to the tables at once), and writes
//! every parameter's gradient to its slot, the token table's as the rows the batch used.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::embedding::Tokens;
use super::grad_slot::{GradSlot, SlotParam};
use super::lif_linear::{linear_backward, linear_forward, linear_param_grads, Drive};
use super::linear_blocks::input_gradient_block;
use super::with_backward3;
use crate::neuron::MultiStepLif;

/// A linear layer whose weight and bias gradients are written to their slots.
#[derive(Debug, Clone)]
pub struct SlotLinear {
    pub weight: SlotParam,
    pub bias: SlotParam,
}

impl SlotLinear {
    /// A layer of `[O, K]` weights and `[O]` biases.
    pub fn new(weight: Tensor, bias: Tensor) -> Self {
        Self {
            weight: SlotParam::new(weight),
            bias: SlotParam::new(bias),
        }
    }

    /// Weights and biases.
    pub fn params(&self) -> usize {
        self.weight.value().elem_count() + self.bias.value().elem_count()
    }

    fn parts(&self) -> (&SlotParam, &SlotParam) {
        (&self.weight, &self.bias)
    }

    pub fn grad_slots(&self) -> [GradSlot; 2] {
        [self.weight.grad().clone(), self.bias.grad().clone()]
    }
}

/// Features `[T, B, O]` of token ids `[B, L]`: the embedding `token[ids] + position[..L]`,
/// flattened to `[B, L * W]` and held over `steps` steps, through the two layers, each a LIF
/// and the linear layer its spikes feed. The values and gradients of the composition of
/// `token_embedding`, a repeat over a new leading axis and two `lif_linear`s.
pub fn text_mlp(
    ids: &Tensor,
    embedding: (&SlotParam, &SlotParam),
    [(lif1, fc1), (lif2, fc2)]: [(&MultiStepLif, &SlotLinear); 2],
    steps: usize,
) -> Result<Tensor> {
    let tokens = Tokens::new(ids, embedding.0.value().dim(0)?)?;
    let x = tokens
        .embed(embedding.0.value(), embedding.1.value())?
        .flatten_from(1)?;
    let b = x.dim(0)?;
    let (hidden, bits1) = linear_forward(lif1, (x, Drive::Held(steps)), fc1.parts())?;
    let hidden = hidden.reshape((steps, b, ()))?;
    let (out, bits2) = linear_forward(lif2, (hidden.clone(), Drive::PerStep), fc2.parts())?;
    let (bits1, bits2) = (Arc::new(bits1), Arc::new(bits2));
    let args = [embedding.0.value(), fc1.weight.value(), fc2.weight.value()];
    let (token, position) = (embedding.0.clone(), embedding.1.clone());
    let (lif1, lif2, fc1, fc2) = (lif1.clone(), lif2.clone(), fc1.clone(), fc2.clone());
    let bwd = move |_: [&Tensor; 3], grad: &Tensor| {
        let grad = grad.reshape(((), fc2.weight.value().dim(0)?))?;
        let hidden_in = (&hidden, Drive::PerStep);
        let grad = linear_backward(&lif2, hidden_in, &bits2, fc2.parts(), &grad)?;
        let grad = grad
            .reshape(((), fc1.weight.value().dim(0)?))?
            .contiguous()?;
        linear_param_grads(&bits1, fc1.parts(), &grad)?;
        // fc1's input gradient a token position at a time: the block of the embedding it
        // reads recomputed from the ids, the block of its gradient added to the tables at once.
        let (w, weight) = (token.value().dim(1)?, fc1.weight.value());
        token.grad().include_rows(tokens.ids(), w)?;
        let mut positions = vec![0f32; position.value().elem_count()];
        for l in 0..tokens.len() {
            let x = tokens.embed_at(l, token.value(), position.value())?;
            let held = (&x, Drive::Held(steps));
            let g = input_gradient_block(&lif1, held, (weight, l * w..(l + 1) * w), &grad)?;
            tokens.backward_at(l, &g, &token, &mut positions)?;
        }
        position.grad().fill_dense(|out| {
            out.copy_from_slice(&positions);
            Ok(())
        })?;
        Ok((None, None, None))
    };
    with_backward3("text-mlp", args, out.reshape((steps, b, ()))?, bwd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::embedding::token_embedding;
    use crate::kernels::grad_slot::SlotGrad;
    use crate::kernels::lif_linear::lif_linear;
    use crate::kernels::test_util::max_rel_diff;
    use crate::neuron::LifConfig;
    use candle_core::{Device, Var};

    /// A parameter's gradient from its slot, as a dense tensor of its shape.
    fn slot_gradient(param: &SlotParam) -> Result<Tensor> {
        let shape = param.value().shape().clone();
        let values = match param.grad().take()? {
            Some(SlotGrad::Dense(values)) => values,
            Some(SlotGrad::Product(product)) => {
                let mut values = vec![0f32; shape.elem_count()];
                product.write_into(&mut values)?;
                values
            }
            Some(SlotGrad::Rows(rows)) => {
                let mut values = vec![0f32; shape.elem_count()];
                for (id, row) in values.chunks_exact_mut(rows.width()).enumerate() {
                    if let Some(g) = rows.row(id) {
                        row.copy_from_slice(g);
                    }
                }
                values
            }
            None => panic!("no gradient for {:?}", shape),
        };
        Tensor::from_vec(values, shape, &Device::Cpu)
    }

    /// Values and every parameter's gradient equal those of the composed ops: the embedding op,
    /// the repeat over T and two `lif_linear`s. Exactly, but for the token table's rows where an
    /// id repeats, whose gradients are summed position by position instead of sentence by
    /// sentence (float rounding).
    #[test]
    fn matches_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (vocab, w, l, hidden, out, steps) = (13, 8, 3, 16, 8, 4);
        let param = |t: Tensor| -> Result<SlotParam> {
            Ok(SlotParam::new(Var::from_tensor(&t)?.as_tensor().clone()))
        };
        let token = param((Tensor::randn(0f32, 1.0, (vocab, w), &dev)? * 1.5)?)?;
        let position = param(Tensor::randn(0.3f32, 0.2, (5, w), &dev)?)?;
        let linear = |o: usize, k: usize| -> Result<SlotLinear> {
            let weight = param((Tensor::randn(0f32, 1.0, (o, k), &dev)? * 0.6)?)?;
            let bias = param(Tensor::randn(0.2f32, 0.3, o, &dev)?)?;
            Ok(SlotLinear { weight, bias })
        };
        let (fc1, fc2) = (linear(hidden, l * w)?, linear(out, hidden)?);
        let ids = Tensor::new(
            &[[3u32, 7, 3], [0, 3, 9], [12, 1, 1], [5, 7, 0], [3, 3, 3]],
            &dev,
        )?;
        let lif = MultiStepLif::new(LifConfig::default());
        let layers = [(&lif, &fc1), (&lif, &fc2)];
        let ours = text_mlp(&ids, (&token, &position), layers, steps)?;

        let e = token_embedding(&ids, &token, &position)?.flatten_from(1)?;
        let x = e
            .unsqueeze(0)?
            .broadcast_as((steps, 5, l * w))?
            .contiguous()?;
        let fed = |x: &Tensor, fc: &SlotLinear| {
            lif_linear(&lif, x, fc.weight.value(), Some(fc.bias.value()))
        };
        let theirs = fed(&fed(&x, &fc1)?, &fc2)?;
        assert_eq!(ours.to_vec3::<f32>()?, theirs.to_vec3::<f32>()?);
        let spikes = lif.forward(&x)?;
        let rate = spikes.mean_all()?.to_scalar::<f32>()?;
        assert!(rate > 0.05, "the first layer hardly fires: {rate}");

        let g = Tensor::randn(0f32, 1.0, ours.dims(), &dev)?;
        let linears = [&fc1.weight, &fc1.bias, &fc2.weight, &fc2.bias];
        let tables = [&token, &position];
        (ours * &g)?.sum_all()?.backward()?;
        let ours = |params: &[&SlotParam]| -> Result<Vec<Vec<f32>>> {
            params
                .iter()
                .map(|p| slot_gradient(p)?.flatten_all()?.to_vec1())
                .collect()
        };
        let (our_linears, our_tables) = (ours(&linears)?, ours(&tables)?);
        // The composition's layers give their gradients to candle; its embedding op writes the
        // tables' to the same slots as ours.
        let grads = (theirs * &g)?.sum_all()?.backward()?;
        // The composition's small layers may take the spike-driven weight gradient, which sums
        // in another order than the blocked product: equal up to rounding.
        for (p, ours) in linears.iter().zip(&our_linears) {
            let theirs = grads.get(p.value()).expect("a candle gradient");
            let diff = max_rel_diff(&Tensor::new(ours.as_slice(), &dev)?, &theirs.flatten_all()?);
            assert!(diff < 1e-5, "{:?} differs by {diff}", p.value().dims());
        }
        let [our_token, our_position] = [&our_tables[0], &our_tables[1]];
        let their_tables = ours(&tables)?;
        assert_eq!(our_position, &their_tables[1]);
        let as_tensor = |v: &Vec<f32>| Tensor::new(v.as_slice(), &dev);
        let diff = max_rel_diff(&as_tensor(our_token)?, &as_tensor(&their_tables[0])?);
        assert!(diff < 1e-6, "token rows differ by {diff}");
        for grad in our_linears.iter().chain([our_token]) {
            assert!(grad.iter().any(|&v| v != 0.0), "a gradient is all zeros");
        }
        Ok(())
    }
}
