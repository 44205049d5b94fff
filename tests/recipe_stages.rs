//! The recipe's stages on the built-in world with a deliberately small probe student, so the
//! machinery (losses, trainable sets, checkpoints, resume, evaluation) is tested fast and apart
//! from the encoders.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarMap};
use spikeclip::data::prompts::DatasetPrompts;
use spikeclip::data::world::{Split, World, WorldConfig, DATASET};
use spikeclip::recipe::{self, FinetuneTargets, Student};
use spikeclip::teacher::{TextTeacher, Tokenize};
use spikeclip::train::loss::DualLossConfig;
use spikeclip::train::stage::{StageConfig, StageRun};

struct Probe {
    varmap: VarMap,
    image: Linear,
    embed: Embedding,
    text: Linear,
}

impl Probe {
    fn new(vocab: usize, dim: usize) -> Self {
        let varmap = VarMap::new();
        let vb = spikeclip::train::init::seeded_var_builder(&varmap, 3, DType::F32, &Device::Cpu);
        Self {
            image: candle_nn::linear(48, dim, vb.pp("image.proj")).unwrap(),
            embed: candle_nn::embedding(vocab, 16, vb.pp("text.embed")).unwrap(),
            text: candle_nn::linear(16, dim, vb.pp("text.proj")).unwrap(),
            varmap,
        }
    }
}

impl Student for Probe {
    fn image_features(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        self.image.forward(&x.avg_pool2d(8)?.flatten_from(1)?)
    }
    fn text_features(&self, ids: &Tensor, _train: bool) -> Result<Tensor> {
        self.text.forward(&self.embed.forward(ids)?.mean(1)?)
    }
    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
}

fn world() -> World {
    World::new(WorldConfig {
        seed: 11,
        train_images: 256,
        test_images: 96,
        dtext_sentences: 512,
        embed_dim: 64,
        ..WorldConfig::default()
    })
}

fn config(epochs: usize, lr: f64) -> StageConfig {
    StageConfig {
        epochs,
        batch_size: 32,
        lr,
        eta_min: lr / 10.0,
        t_max: None,
        weight_decay: 0.0,
        amsgrad: false,
        seed: 5,
    }
}

fn run<'a>(
    name: &'a str,
    dir: &'a std::path::Path,
    s: &'a Probe,
    c: &'a StageConfig,
) -> StageRun<'a> {
    StageRun {
        name,
        out_dir: dir,
        varmap: s.varmap(),
        config: c,
        resume: false,
        show_progress: false,
        observer: None,
    }
}

#[test]
fn each_stage_lowers_its_loss_and_fine_tuning_beats_chance() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Device::Cpu;
    let w = world();
    let probe = Probe::new(w.tokenizer().vocab_size(), 64);
    let cfg = config(4, 2e-2);

    let text = recipe::distill_text(
        &probe,
        &w.dtext(),
        run("text", dir.path(), &probe, &cfg),
        &dev,
        None,
    )?;
    assert!(
        text.epochs.last().unwrap().loss < text.epochs[0].loss,
        "{:?}",
        text.epochs
    );
    let train = w.images(Split::Train);
    let image = recipe::distill_image(
        &probe,
        &train,
        run("image", dir.path(), &probe, &cfg),
        &dev,
        None,
    )?;
    assert!(
        image.epochs.last().unwrap().loss < image.epochs[0].loss,
        "{:?}",
        image.epochs
    );

    let classes = |prompts: &DatasetPrompts| -> anyhow::Result<(Tensor, Tensor)> {
        Ok((
            recipe::student_class_embeddings(&probe, w.tokenizer(), prompts, 20, &dev)?,
            spikeclip::eval::zeroshot::class_embeddings(prompts, |t| w.teacher().text_features(t))?,
        ))
    };
    // Fine-tuning learns the training split's labels; zero-shot scoring picks among all pairs.
    let (student_all, teacher_all) = classes(&World::prompts().datasets[DATASET])?;
    let (student_classes, teacher_classes) = classes(&World::split_prompts(Split::Train))?;
    let before = recipe::zero_shot(&probe, &w.images(Split::TestSeen), &student_all, &dev)?;
    let targets = FinetuneTargets {
        student_classes,
        teacher_classes,
        teacher_logit_scale: 100.0,
    };
    let fine = recipe::finetune(
        &probe,
        &train,
        &targets,
        &DualLossConfig::default(),
        run("finetune", dir.path(), &probe, &cfg),
        &dev,
        None,
    )?;
    assert!(
        fine.epochs.last().unwrap().loss < fine.epochs[0].loss,
        "{:?}",
        fine.epochs
    );
    let after = recipe::zero_shot(&probe, &w.images(Split::TestSeen), &student_all, &dev)?;
    assert!(
        after.top1() > 2.0 / 24.0,
        "fine-tuned top-1 {}",
        after.top1()
    );
    assert!(after.top1() >= before.top1(), "{before:?} -> {after:?}");
    let teacher = recipe::teacher_zero_shot(&w.images(Split::TestUnseen), &teacher_all, &dev)?;
    assert!(teacher.top1() > 0.95);
    // Metrics of all three stages went to one JSONL file.
    let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl"))?;
    assert_eq!(lines.lines().count(), 12);
    Ok(())
}

#[test]
fn image_stages_train_only_the_image_tower() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let w = world();
    let probe = Probe::new(w.tokenizer().vocab_size(), 64);
    let text_before = probe.text.weight().flatten_all()?.to_vec1::<f32>()?;
    let image_before = probe.image.weight().flatten_all()?.to_vec1::<f32>()?;
    let cfg = config(1, 1e-2);
    recipe::distill_image(
        &probe,
        &w.images(Split::Train),
        run("image", dir.path(), &probe, &cfg),
        &Device::Cpu,
        None,
    )?;
    assert_eq!(
        probe.text.weight().flatten_all()?.to_vec1::<f32>()?,
        text_before
    );
    assert_ne!(
        probe.image.weight().flatten_all()?.to_vec1::<f32>()?,
        image_before
    );
    Ok(())
}

#[test]
fn resume_continues_bit_identically_and_best_is_kept() -> anyhow::Result<()> {
    let w = world();
    let data = w.dtext();
    let vocab = w.tokenizer().vocab_size();
    let weights = |p: &Probe| -> Vec<Vec<u32>> {
        spikeclip::train::checkpoint::named_vars(p.varmap())
            .iter()
            .map(|(_, v)| {
                let vals: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                vals.iter().map(|x| x.to_bits()).collect()
            })
            .collect()
    };
    let mut score = 0.0;
    let mut metric = || -> anyhow::Result<f64> {
        score += 1.0;
        Ok(score)
    };
    // Uninterrupted: 4 epochs.
    let straight_dir = tempfile::tempdir()?;
    let straight = Probe::new(vocab, 64);
    let c4 = config(4, 1e-2);
    let out = recipe::distill_text(
        &straight,
        &data,
        run("t", straight_dir.path(), &straight, &c4),
        &Device::Cpu,
        Some(&mut metric),
    )?;
    assert!(out.best.as_ref().unwrap().exists());
    // Interrupted after 2 epochs, resumed into a fresh model for the remaining 2.
    let dir = tempfile::tempdir()?;
    let first = Probe::new(vocab, 64);
    let c2 = StageConfig {
        epochs: 2,
        ..c4.clone()
    };
    // Same schedule as the 4-epoch run: t_max pinned to 4.
    let c2 = StageConfig {
        t_max: Some(4),
        ..c2
    };
    let c4r = StageConfig {
        t_max: Some(4),
        ..c4
    };
    recipe::distill_text(
        &first,
        &data,
        run("t", dir.path(), &first, &c2),
        &Device::Cpu,
        None,
    )?;
    let resumed = Probe::new(vocab, 64);
    let mut r = run("t", dir.path(), &resumed, &c4r);
    r.resume = true;
    let tail = recipe::distill_text(&resumed, &data, r, &Device::Cpu, None)?;
    assert_eq!(tail.epochs.len(), 2);
    assert_eq!(tail.epochs[0].epoch, 3);
    assert_eq!(weights(&resumed), weights(&straight));
    Ok(())
}

#[test]
fn nan_loss_stops_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    let probe = Probe::new(w.tokenizer().vocab_size(), 64);
    let cfg = config(1, f64::NAN);
    let err = recipe::distill_text(
        &probe,
        &w.dtext(),
        run("t", dir.path(), &probe, &cfg),
        &Device::Cpu,
        None,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("last good checkpoint"), "{msg}");
}
