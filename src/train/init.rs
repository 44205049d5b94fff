//! Seeded parameter initialisation. candle's CPU random generator cannot be seeded, so a model
//! built from `VarBuilder::from_varmap` starts differently on every run; this backend draws
//! the same initial values as candle's `Init` hints would, but from our seeded [`Rng`], one
//! stream per parameter name, so a seed reproduces a run whatever the construction order.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};

use super::rng::Rng;

/// Creates trainable variables in `varmap` with seeded initial values.
struct SeededBackend {
    varmap: VarMap,
    rng: Rng,
}

/// FNV-1a: a hash of the parameter name that is stable across Rust versions.
fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Values for `shape` following `init`, with the same distributions as candle's `Init::var`.
fn draw(init: Init, shape: &Shape, rng: &mut Rng) -> Vec<f32> {
    let n = shape.elem_count();
    let mut uniform = |lo: f64, up: f64| (0..n).map(|_| rng.range(lo, up) as f32).collect();
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => uniform(lo, up),
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| (mean + stdev * rng.normal()) as f32)
            .collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(-bound, bound)
                }
                NormalOrUniform::Normal => (0..n).map(|_| (std * rng.normal()) as f32).collect(),
            }
        }
    }
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("parameter map lock poisoned".into())
}

impl SimpleBackend for SeededBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let mut vars = self.varmap.data().lock().map_err(|_| poisoned())?;
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!(
                    "parameter {name} requested with shape {shape:?}, exists with {:?}",
                    var.shape()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let values = draw(init, &shape, &mut self.rng.fork(name_key(name)));
        // An f32 parameter takes the drawn values as they are: `Var::from_tensor` would copy
        // them, and the freed copy of a table like CLIP's token embedding (97 MiB) would stay
        // resident under an allocator that keeps freed memory.
        let var = match dtype {
            DType::F32 => Var::from_vec(values, shape, dev)?,
            _ => Var::from_tensor(&Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?)?,
        };
        vars.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let vars = self.varmap.data().lock().map_err(|_| poisoned())?;
        match vars.get(name) {
            Some(var) => var.as_tensor().to_device(dev)?.to_dtype(dtype),
            None => {
                candle_core::bail!("parameter {name} does not exist and has no shape to create it")
            }
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .is_ok_and(|vars| vars.contains_key(name))
    }
}

/// A `VarBuilder` whose new parameters go into `varmap`, initialised from `seed`.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> VarBuilder<'static> {
    let backend = SeededBackend {
        varmap: varmap.clone(),
        rng: Rng::new(seed),
    };
    VarBuilder::from_backend(Box::new(backend), dtype, dev.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear_weights(seed: u64, first: &str) -> Vec<Vec<f32>> {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
        // Construction order must not matter: build the two layers in either order.
        let names = if first == "a" { ["a", "b"] } else { ["b", "a"] };
        for n in names {
            candle_nn::linear(64, 32, vb.pp(n)).unwrap();
        }
        ["a.weight", "a.bias", "b.weight"]
            .iter()
            .map(|n| {
                vm.data().lock().unwrap()[*n]
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn same_seed_same_init_in_any_order_with_candles_distribution() {
        let w = linear_weights(1, "a");
        assert_eq!(w, linear_weights(1, "b"));
        assert_ne!(w, linear_weights(2, "a"));
        assert_ne!(w[0], w[2]);
        // candle's linear: Kaiming-normal weight, gain sqrt(2), fan-in 64: std sqrt(2)/8.
        let n = w[0].len() as f32;
        let std = (w[0].iter().map(|x| x * x).sum::<f32>() / n).sqrt();
        assert!((std / (2f32.sqrt() / 8.0) - 1.0).abs() < 0.1, "std {std}");
        let bias_bound = 1.0 / 8.0;
        assert!(w[1].iter().all(|x| x.abs() <= bias_bound) && w[1].iter().any(|x| *x != 0.0));
    }
}
