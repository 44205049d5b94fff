//! The text encoder's training path (its fused op writing gradients to slots, the token table's
//! as rows, the weights' as products, and Adam updating in place) against candle's dense
//! autograd through the composed ops, step for step.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use spikeclip::kernels::lif_linear::lif_linear;
use spikeclip::model::config::SpikeClipConfig;
use spikeclip::model::readout::Readout;
use spikeclip::model::SpikeClip;
use spikeclip::neuron::{LifConfig, MultiStepLif};
use spikeclip::recipe::student::trainable;
use spikeclip::recipe::Student;
use spikeclip::train::grads::Gradients;
use spikeclip::train::loss::cosine_distillation;
use spikeclip::train::optim::{Adam, AdamConfig};

/// The tiny preset's text encoder as the authors compose it from candle's ops on the weights
/// of `s`: embedding lookup plus positions, flattened, repeated over T, two LIF + linear
/// layers and the readout.
fn composed_text_features(s: &SpikeClip, ids: &Tensor) -> Result<Tensor> {
    let (cfg, t) = (&s.config.text, s.config.time_steps);
    let vb = VarBuilder::from_varmap(s.varmap(), DType::F32, &Device::Cpu).pp("text");
    let emb = vb.pp("clip_embedding");
    let token = candle_nn::embedding(cfg.vocab_size, cfg.width, emb.pp("token_embedding"))?;
    let position = emb
        .pp("position_embedding")
        .get((cfg.max_positions, cfg.width), "weight")?;
    let flat = cfg.context_length * cfg.width;
    let fc1 = candle_nn::linear(flat, cfg.hidden, vb.pp("fc1"))?;
    let fc2 = candle_nn::linear(cfg.hidden, s.config.out_dim, vb.pp("fc2"))?;
    let readout = Readout::new(s.config.readout, t, vb)?;
    let (b, l) = ids.dims2()?;
    let e = token
        .forward(ids)?
        .broadcast_add(&position.narrow(0, 0, l)?)?
        .flatten_from(1)?;
    let x = e.unsqueeze(0)?.broadcast_as((t, b, flat))?.contiguous()?;
    let lif = MultiStepLif::new(LifConfig::default());
    let h = lif_linear(&lif, &x, fc1.weight(), fc1.bias())?;
    readout.forward(&lif_linear(&lif, &h, fc2.weight(), fc2.bias())?)
}

/// Token ids `[b, L]` of the tiny vocabulary: distinct throughout when `distinct`, else with
/// repeats within and across sentences.
fn ids(cfg: &SpikeClipConfig, b: usize, distinct: bool) -> Result<Tensor> {
    let (vocab, l) = (cfg.text.vocab_size, cfg.text.context_length);
    let ids: Vec<u32> = (0..b * l)
        .map(|i| match distinct {
            true => (i * 37 % vocab) as u32,
            false => (i % 7 * 11) as u32,
        })
        .collect();
    Tensor::from_vec(ids, (b, l), &Device::Cpu)
}

/// Every text parameter and every entry of the optimiser state, by name.
fn snapshot(s: &SpikeClip, adam: &Adam) -> Result<Vec<(String, Vec<f32>)>> {
    let mut out: Vec<(String, Vec<f32>)> = trainable(s, "text.")
        .into_iter()
        .map(|(name, var)| Ok((name, var.as_tensor().flatten_all()?.to_vec1()?)))
        .collect::<Result<_>>()?;
    for (name, t) in adam.state_tensors()? {
        out.push((name, t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Three steps of distillation through the encoder's own path and through the composed ops
/// with candle's dense gradients, from the same weights, leave every weight and moment
/// bit-identical. The ids are distinct, so that no table row sums gradients in two orders, and
/// Adam has AMSGrad and weight decay, so that the many rows without a gradient move too.
#[test]
fn trains_step_for_step_as_dense_autograd_does() -> Result<()> {
    let cfg = SpikeClipConfig::preset("tiny").unwrap();
    let (ours, theirs) = (
        SpikeClip::new(&cfg, 3, &Device::Cpu)?,
        SpikeClip::new(&cfg, 3, &Device::Cpu)?,
    );
    let adam_cfg = AdamConfig {
        lr: 0.01,
        weight_decay: 0.01,
        amsgrad: true,
        ..AdamConfig::default()
    };
    let mut ours_adam = Adam::new(trainable(&ours, "text."), adam_cfg.clone());
    let mut theirs_adam = Adam::new(trainable(&theirs, "text."), adam_cfg);
    let x = ids(&cfg, 6, true)?;
    let target = Tensor::randn(0f32, 1.0, (6, cfg.out_dim), &Device::Cpu)?;
    for step in 0..3 {
        let loss = cosine_distillation(&ours.text_features(&x, true)?, &target)?;
        ours_adam.step(&Gradients::backward(&loss, &ours.grad_slots())?)?;
        let loss = cosine_distillation(&composed_text_features(&theirs, &x)?, &target)?;
        theirs_adam.step(&Gradients::from(loss.backward()?))?;
        let (a, b) = (
            snapshot(&ours, &ours_adam)?,
            snapshot(&theirs, &theirs_adam)?,
        );
        assert_eq!(a.len(), b.len());
        for ((name, a), (_, b)) in a.iter().zip(&b) {
            assert!(a == b, "step {step}: {name} differs");
        }
    }
    Ok(())
}

/// With repeated ids the table's rows sum their gradients position by position rather than
/// sentence by sentence: the gradients agree to float rounding.
#[test]
fn repeated_ids_agree_to_rounding() -> Result<()> {
    let cfg = SpikeClipConfig::preset("tiny").unwrap();
    let s = SpikeClip::new(&cfg, 4, &Device::Cpu)?;
    let x = ids(&cfg, 5, false)?;
    let target = Tensor::randn(0f32, 1.0, (5, cfg.out_dim), &Device::Cpu)?;
    let table = trainable(&s, "text.clip_embedding.token_embedding")
        .pop()
        .expect("the token table")
        .1;
    // Adam at learning rate 0 leaves the weights and records each gradient as m / (1 - beta1).
    let moment = |features: Tensor, slotted: bool| -> Result<Tensor> {
        let loss = cosine_distillation(&features, &target)?;
        let grads = match slotted {
            true => Gradients::backward(&loss, &s.grad_slots())?,
            false => Gradients::from(loss.backward()?),
        };
        let cfg = AdamConfig {
            lr: 0.0,
            ..AdamConfig::default()
        };
        let mut adam = Adam::new(vec![("table".into(), table.clone())], cfg);
        adam.step(&grads)?;
        Ok(adam.state_tensors()?["table.m"].clone())
    };
    let ours = moment(s.text_features(&x, true)?, true)?;
    let theirs = moment(composed_text_features(&s, &x)?, false)?;
    let scale = theirs.abs()?.max_all()?.to_scalar::<f32>()?;
    let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(
        scale > 0.0 && diff <= 1e-6 * scale,
        "diff {diff} at scale {scale}"
    );
    Ok(())
}
