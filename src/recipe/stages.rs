//! The three training stages and zero-shot evaluation, written once for any [`Student`].

use candle_core::{Device, Tensor, D};

use super::student::{trainable, Student};
use crate::data::prompts::DatasetPrompts;
use crate::data::{ImageFeatureSet, TextFeatureSet};
use crate::eval::zeroshot::{class_embeddings, TopK};
use crate::progress::Progress;
use crate::teacher::Tokenize;
use crate::train::loss::{cosine_distillation, cosine_logits, dual_loss, DualLossConfig};
use crate::train::stage::{StageOutcome, StageRun};

/// Batch size of evaluation passes (no gradients, so larger than training's).
const EVAL_BATCH: usize = 256;

/// Stage 0: the text encoder learns to reproduce the teacher's text features (1 - cosine), every
/// text parameter trained, embeddings included.
pub fn distill_text(
    student: &dyn Student,
    data: &dyn TextFeatureSet,
    run: StageRun,
    device: &Device,
    metric: Option<&mut dyn FnMut() -> anyhow::Result<f64>>,
) -> anyhow::Result<StageOutcome> {
    run.run(
        trainable(student, "text."),
        &student.grad_slots(),
        data.len(),
        |idx| {
            let batch = data.batch(idx, device)?;
            let feats = student.text_features(&batch.token_ids, true)?;
            Ok(cosine_distillation(&feats, &batch.teacher)?)
        },
        metric,
    )
}

/// Stage 1: the image encoder learns to reproduce the teacher's image features (1 - cosine).
pub fn distill_image(
    student: &dyn Student,
    data: &dyn ImageFeatureSet,
    run: StageRun,
    device: &Device,
    metric: Option<&mut dyn FnMut() -> anyhow::Result<f64>>,
) -> anyhow::Result<StageOutcome> {
    run.run(
        trainable(student, "image."),
        &student.grad_slots(),
        data.len(),
        |idx| {
            let batch = data.batch(idx, device)?;
            let feats = student.image_features(&batch.inputs, true)?;
            Ok(cosine_distillation(&feats, &batch.teacher)?)
        },
        metric,
    )
}

/// The class embeddings fine-tuning needs: the frozen student text encoder's (what the
/// student's logits are measured against) and the teacher's, with CLIP's logit scale, for
/// CLIP's class distribution in the KL term.
pub struct FinetuneTargets {
    pub student_classes: Tensor,
    pub teacher_classes: Tensor,
    /// CLIP's learned temperature (100 for OpenAI's models).
    pub teacher_logit_scale: f64,
}

/// Stage 2: the image encoder alone learns the labels with the dual loss: cross-entropy over
/// cosine logits against the student's class embeddings, plus lambda * KL to CLIP's class
/// distribution for the same image.
pub fn finetune(
    student: &dyn Student,
    data: &dyn ImageFeatureSet,
    targets: &FinetuneTargets,
    loss_cfg: &DualLossConfig,
    run: StageRun,
    device: &Device,
    metric: Option<&mut dyn FnMut() -> anyhow::Result<f64>>,
) -> anyhow::Result<StageOutcome> {
    anyhow::ensure!(
        !data.class_names().is_empty(),
        "fine-tuning needs a labelled dataset"
    );
    for (what, classes) in [
        ("student", &targets.student_classes),
        ("teacher", &targets.teacher_classes),
    ] {
        let rows = classes.dim(0)?;
        anyhow::ensure!(
            rows == data.class_names().len(),
            "fine-tuning: the dataset has {} classes but the {what} has {rows} class embeddings",
            data.class_names().len()
        );
    }
    // Teachers give their class embeddings on the CPU (see [`crate::teacher::TextTeacher`]).
    let student_classes = targets.student_classes.detach().to_device(device)?;
    let teacher_classes = targets.teacher_classes.to_device(device)?;
    run.run(
        trainable(student, "image."),
        &student.grad_slots(),
        data.len(),
        |idx| {
            let batch = data.batch(idx, device)?;
            let teacher_logits = cosine_logits(
                &batch.teacher,
                &teacher_classes,
                Some(targets.teacher_logit_scale),
            )?;
            let teacher_probs = candle_nn::ops::softmax(&teacher_logits, D::Minus1)?;
            let labels = Tensor::new(batch.labels.as_slice(), device)?;
            let feats = student.image_features(&batch.inputs, true)?;
            let loss = dual_loss(&feats, &student_classes, &teacher_probs, &labels, loss_cfg)?;
            Ok(loss.total)
        },
        metric,
    )
}

/// Prompt-ensembled class embeddings `[C, D]` from the student's text encoder (eval mode).
pub fn student_class_embeddings(
    student: &dyn Student,
    tokenizer: &dyn Tokenize,
    prompts: &DatasetPrompts,
    max_len: usize,
    device: &Device,
) -> anyhow::Result<Tensor> {
    class_embeddings(prompts, |texts| {
        let rows = tokenizer.encode(texts, max_len)?;
        let n = rows.len();
        let ids = Tensor::from_vec(rows.concat(), (n, max_len), device)?;
        Ok(student.text_features(&ids, false)?)
    })
}

/// Zero-shot top-1/top-5 of the student's image encoder (eval mode) on `data` against unit
/// class embeddings `[C, D]`.
pub fn zero_shot(
    student: &dyn Student,
    data: &dyn ImageFeatureSet,
    classes: &Tensor,
    device: &Device,
) -> anyhow::Result<TopK> {
    zero_shot_with_progress(student, data, classes, device, &mut Progress::hidden())
}

/// [`zero_shot`], counting the images scored on `progress`.
pub fn zero_shot_with_progress(
    student: &dyn Student,
    data: &dyn ImageFeatureSet,
    classes: &Tensor,
    device: &Device,
    progress: &mut Progress,
) -> anyhow::Result<TopK> {
    let classes = classes.to_device(device)?;
    score_batches(data, device, progress, |batch| {
        let feats = student.image_features(&batch.inputs, false)?;
        Ok(cosine_logits(&feats, &classes, None)?)
    })
}

/// Zero-shot top-1/top-5 of the teacher itself: its cached image features against its own
/// class embeddings.
pub fn teacher_zero_shot(
    data: &dyn ImageFeatureSet,
    classes: &Tensor,
    device: &Device,
) -> anyhow::Result<TopK> {
    // Teachers give their class embeddings on the CPU (see [`crate::teacher::TextTeacher`]).
    let classes = classes.to_device(device)?;
    score_batches(data, device, &mut Progress::hidden(), |batch| {
        Ok(cosine_logits(&batch.teacher, &classes, None)?)
    })
}

fn score_batches(
    data: &dyn ImageFeatureSet,
    device: &Device,
    progress: &mut Progress,
    mut logits: impl FnMut(&crate::data::ImageBatch) -> anyhow::Result<Tensor>,
) -> anyhow::Result<TopK> {
    // Under MPI each rank scores its part of the set and the counts are summed.
    let job = crate::dist::collective();
    let mut acc = TopK::default();
    let all: Vec<usize> = (0..data.len()).collect();
    for idx in crate::dist::shard(&all, job).chunks(EVAL_BATCH) {
        let batch = data.batch(idx, device)?;
        acc = acc.merge(TopK::from_logits(&logits(&batch)?, &batch.labels)?);
        progress.inc(idx.len());
    }
    let mut counts = [acc.correct1, acc.correct5, acc.total].map(|n| n as f64);
    job.all_reduce_sum_f64(&mut counts);
    let [correct1, correct5, total] = counts.map(|n| n as usize);
    Ok(TopK {
        correct1,
        correct5,
        total,
    })
}
