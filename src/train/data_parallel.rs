//! A training stage spread over the ranks of a data-parallel job ([`crate::dist`]): every rank
//! draws the same batches and trains on its own part of each, with the job's gradients.
//!
//! Rank 0's weights are broadcast at the start and the arguments compared, each rank's loss
//! is weighted by its share of the global batch so that the summed gradients are the global
//! batch's, and a checksum of the weights is compared every [`DRIFT_EVERY`] steps and at
//! every epoch's end. Alone, every method is the identity and costs nothing.

use std::time::Instant;

use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use super::checkpoint::named_vars;
use super::grads::Gradients;
use super::stage::StageConfig;
use crate::dist::{self, Collective, Digest};

/// Steps between two comparisons of the weights across ranks.
pub const DRIFT_EVERY: u64 = 100;

/// One stage's view of the job.
pub struct DataParallel {
    c: &'static dyn Collective,
    /// Gradient all-reduces since the last [`DataParallel::traffic`]: calls, bytes, seconds.
    reduced: (usize, usize, f64),
}

impl DataParallel {
    /// Joins the stage on every rank: refuses batches some rank would get no item of, compares
    /// the stage's settings and parameters' names and shapes, and gives every rank rank 0's
    /// weights (a resumed run's ranks all read the same checkpoint; this makes sure).
    pub fn start(
        name: &str,
        cfg: &StageConfig,
        len: usize,
        varmap: &VarMap,
    ) -> anyhow::Result<Self> {
        let c = dist::collective();
        let dp = Self {
            c,
            reduced: (0, 0, 0.0),
        };
        if c.size() == 1 {
            return Ok(dp);
        }
        let last = len % cfg.batch_size;
        anyhow::ensure!(
            cfg.batch_size >= c.size() && (last == 0 || last >= c.size()),
            "stage {name}: the global batch ({}) and the last batch of an epoch ({} of {len} \
             items) must each have at least one item per rank ({} ranks)",
            cfg.batch_size,
            if last == 0 { cfg.batch_size } else { last },
            c.size()
        );
        let vars = named_vars(varmap);
        let mut layout = Digest::default()
            .bytes(name.as_bytes())
            .bytes(serde_json::to_string(cfg)?.as_bytes())
            .bytes(&(len as u64).to_le_bytes());
        for (n, v) in &vars {
            layout = layout.bytes(format!("{n}{:?}", v.dims()).as_bytes());
        }
        dist::ensure_same(
            &format!("stage {name}'s settings, data size or model"),
            layout.value(),
            c,
        )?;
        for (_, var) in &vars {
            let t = var.as_tensor();
            let mut values = t.flatten_all()?.to_vec1::<f32>()?;
            c.broadcast_f32(&mut values);
            var.set(&Tensor::from_vec(values, t.shape(), t.device())?)?;
        }
        Ok(dp)
    }

    /// This rank's part of a global batch.
    pub fn local<'a>(&self, batch: &'a [usize]) -> &'a [usize] {
        dist::shard(batch, self.c)
    }

    /// This rank's mean loss over its `local` items weighted by its share of the `global`
    /// batch: the ranks' weighted losses sum to the global batch's mean.
    pub fn weighted(
        &self,
        loss: Tensor,
        local: usize,
        global: usize,
    ) -> candle_core::Result<Tensor> {
        if self.c.size() == 1 {
            return Ok(loss);
        }
        loss * (local as f64 / global as f64)
    }

    /// The global batch's mean loss: the sum of the ranks' [`DataParallel::weighted`] losses.
    pub fn global_loss(&self, weighted: f32) -> f32 {
        if self.c.size() == 1 {
            return weighted;
        }
        let mut sum = [weighted as f64];
        self.c.all_reduce_sum_f64(&mut sum);
        sum[0] as f32
    }

    /// Sums the step's gradients of `params` over the ranks.
    pub fn reduce(
        &mut self,
        grads: &mut Gradients,
        params: &[(String, Var)],
    ) -> candle_core::Result<()> {
        if self.c.size() == 1 {
            return Ok(());
        }
        let start = Instant::now();
        let bytes = grads.all_reduce(params, self.c)?;
        self.reduced.0 += 1;
        self.reduced.1 += bytes;
        self.reduced.2 += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Fails on every rank if the weights differ between ranks, at `step` (every
    /// [`DRIFT_EVERY`] steps, or always with `now`). BatchNorm's running statistics count when
    /// BatchNorm is synchronised; otherwise each rank's follow its own part of the batches.
    pub fn check_drift(&self, varmap: &VarMap, step: u64, now: bool) -> anyhow::Result<()> {
        if self.c.size() == 1 || !(now || step.is_multiple_of(DRIFT_EVERY)) {
            return Ok(());
        }
        let synced = dist::batch_norm_group().is_some();
        let mut sum = Digest::default();
        for (name, var) in named_vars(varmap) {
            if synced || !name.contains(".running_") {
                sum = sum.f32s(&var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
            }
        }
        dist::ensure_same(
            &format!("the weights' checksum after step {step}"),
            sum.value(),
            self.c,
        )
    }

    /// The gradient traffic per step since the last call, for the log: "N MB in M ms".
    pub fn traffic(&mut self) -> Option<String> {
        let (steps, bytes, secs) = std::mem::replace(&mut self.reduced, (0, 0, 0.0));
        (steps > 0).then(|| {
            format!(
                "all-reduce {:.1} MB in {:.1} ms per step over {} ranks",
                bytes as f64 / steps as f64 / 1e6,
                1e3 * secs / steps as f64,
                self.c.size()
            )
        })
    }
}

/// Fails on every rank, naming `what`, unless every rank's `tensors` hold the same values (any
/// dtype, compared as f32).
pub fn ensure_same_data(what: &str, tensors: &[&Tensor]) -> anyhow::Result<()> {
    let mut digest = Digest::default();
    for t in tensors {
        let values = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        digest = digest.f32s(&values);
    }
    dist::ensure_same(what, digest.value(), dist::collective())
}
