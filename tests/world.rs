//! The built-in world: deterministic, its held-out pairs really held out, its teacher a
//! perfect zero-shot classifier, and its images informative about their class.

mod common;

use candle_core::{Device, Tensor, D};
use spikeclip::data::world::concepts::{Concept, COLOURS, SHAPES};
use spikeclip::data::world::render::{Sample, Subject};
use spikeclip::data::world::{Split, World, WorldConfig, DATASET};
use spikeclip::data::{ImageFeatureSet, TextFeatureSet};
use spikeclip::eval::zeroshot::{class_embeddings, TopK};
use spikeclip::teacher::{TextTeacher, Tokenize};
use spikeclip::train::loss::cosine_logits;

fn world(seed: u64) -> World {
    World::new(WorldConfig {
        seed,
        train_images: 400,
        test_images: 300,
        dtext_sentences: 200,
        ..Default::default()
    })
}

fn all(n: usize) -> Vec<usize> {
    (0..n).collect()
}

#[test]
fn same_seed_same_world_other_seed_other_world() {
    let dev = Device::Cpu;
    let idx = [0, 7, 399];
    let a = world(1).images(Split::Train).batch(&idx, &dev).unwrap();
    let b = world(1).images(Split::Train).batch(&idx, &dev).unwrap();
    let c = world(2).images(Split::Train).batch(&idx, &dev).unwrap();
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v(&a.inputs), v(&b.inputs));
    assert_eq!(v(&a.teacher), v(&b.teacher));
    assert_eq!(a.labels, b.labels);
    assert_ne!(v(&a.inputs), v(&c.inputs));
    let ta = world(1).dtext().batch(&[3, 4], &dev).unwrap();
    let tb = world(1).dtext().batch(&[3, 4], &dev).unwrap();
    assert_eq!(v(&ta.teacher), v(&tb.teacher));
    assert_eq!(
        ta.token_ids.to_vec2::<u32>().unwrap(),
        tb.token_ids.to_vec2::<u32>().unwrap()
    );
}

#[test]
fn unseen_pairs_appear_only_in_text_and_the_unseen_split() {
    let w = world(3);
    let dev = Device::Cpu;
    let labels = |split| {
        w.images(split)
            .batch(&all(w.split_len(split)), &dev)
            .unwrap()
            .labels
    };
    // Labels index each split's own label set: fine-tuning knows only the seen pairs, the
    // test splits every pair.
    let concepts = |split: Split| -> Vec<Concept> {
        let classes = split.classes();
        labels(split).iter().map(|&l| classes[l as usize]).collect()
    };
    assert_eq!(Split::Train.classes().len(), 18);
    assert!(!Split::Train.classes().iter().any(|c| c.is_unseen()));
    assert_eq!(w.images(Split::Train).class_names().len(), 18);
    assert!(!concepts(Split::Train).iter().any(|c| c.is_unseen()));
    assert!(!concepts(Split::TestSeen).iter().any(|c| c.is_unseen()));
    assert!(concepts(Split::TestUnseen).iter().all(|c| c.is_unseen()));
    let test_unseen = labels(Split::TestUnseen);
    let distinct: std::collections::BTreeSet<_> = test_unseen.iter().collect();
    assert_eq!(distinct.len(), Split::TestUnseen.concepts().len());
    let names: Vec<String> = Split::TestUnseen
        .concepts()
        .into_iter()
        .map(Concept::name)
        .collect();
    let captions: Vec<String> = (0..200).map(|i| w.dtext_sentence(i)).collect();
    assert!(names
        .iter()
        .all(|n| captions.iter().any(|c| c.contains(n.as_str()))));
}

#[test]
fn validation_splits_hold_other_images_of_the_same_pairs_as_the_test_splits() {
    let w = world(8);
    let dev = Device::Cpu;
    let n = w.split_len(Split::ValSeen);
    assert_eq!(n, w.split_len(Split::TestSeen));
    for (val, test) in [
        (Split::ValSeen, Split::TestSeen),
        (Split::ValUnseen, Split::TestUnseen),
    ] {
        assert_eq!(val.concepts(), test.concepts());
        assert_eq!(val.classes(), test.classes());
        let v = w.images(val).batch(&all(n), &dev).unwrap();
        let t = w.images(test).batch(&all(n), &dev).unwrap();
        let pixels = |b: &spikeclip::data::ImageBatch| b.inputs.flatten_from(1).unwrap();
        let (pv, pt) = (pixels(&v), pixels(&t));
        let rows = |p: &Tensor| p.to_vec2::<f32>().unwrap();
        let test_rows = rows(&pt);
        assert!(
            rows(&pv).iter().all(|r| !test_rows.contains(r)),
            "{val:?} repeats a {test:?} image"
        );
        let distinct: std::collections::BTreeSet<_> = v.labels.iter().collect();
        assert_eq!(distinct.len(), val.concepts().len(), "{val:?}");
    }
}

#[test]
fn analytic_teacher_is_a_perfect_zero_shot_classifier() {
    let w = world(4);
    let prompts = &World::prompts().datasets[DATASET];
    let classes = class_embeddings(prompts, |texts| w.teacher().text_features(texts)).unwrap();
    for split in [Split::TestSeen, Split::TestUnseen] {
        let batch = w.images(split).batch(&all(300), &Device::Cpu).unwrap();
        let logits = cosine_logits(&batch.teacher, &classes, None).unwrap();
        let acc = TopK::from_logits(&logits, &batch.labels).unwrap().top1();
        assert!(acc >= 0.99, "{split:?}: teacher zero-shot top-1 {acc}");
    }
}

#[test]
fn pixels_carry_the_class_nearest_neighbour() {
    // 1-nearest-neighbour on raw pixels, test-seen against train: far above chance (1/24).
    let w = world(5);
    let dev = Device::Cpu;
    let train = w.images(Split::Train).batch(&all(400), &dev).unwrap();
    let test = w.images(Split::TestSeen).batch(&all(300), &dev).unwrap();
    let flat = |t: &Tensor| t.flatten_from(1).unwrap();
    let (a, b) = (flat(&test.inputs), flat(&train.inputs));
    // Squared distance up to a per-row constant: |b|^2 - 2 a.b.
    let norms = b.sqr().unwrap().sum(1).unwrap().unsqueeze(0).unwrap();
    let dot = (a.matmul(&b.t().unwrap()).unwrap() * 2.0).unwrap();
    let dist = norms.broadcast_sub(&dot).unwrap();
    let nearest = dist.argmin(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    // Train labels index the seen pairs, test labels every pair.
    let seen = Split::Train.classes();
    let pred: Vec<u32> = nearest
        .iter()
        .map(|&j| seen[train.labels[j as usize] as usize].label() as u32)
        .collect();
    let acc = pred
        .iter()
        .zip(&test.labels)
        .filter(|(p, l)| p == l)
        .count() as f64
        / 300.0;
    assert!(acc > 0.3, "pixel 1-NN top-1 {acc}");
}

#[test]
fn inputs_are_clip_normalised_and_shaped() {
    let batch = world(6)
        .images(Split::Train)
        .batch(&[1, 2], &Device::Cpu)
        .unwrap();
    assert_eq!(batch.inputs.dims(), &[2, 3, 32, 32]);
    assert_eq!(batch.teacher.dims(), &[2, 512]);
    let v = batch
        .inputs
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (lo, hi) = v
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
    // 0 and 1 map to -mean/std and (1-mean)/std: about [-1.8, 2.1].
    assert!(
        lo >= -1.80 && hi <= 2.15 && lo < -0.5 && hi > 0.5,
        "{lo} {hi}"
    );
    let err = world(6)
        .images(Split::Train)
        .batch(&[400], &Device::Cpu)
        .unwrap_err();
    assert!(err.to_string().contains("index 400 out of range"), "{err}");
}

#[test]
fn tokenizer_follows_clip_conventions() {
    let w = world(7);
    let tok = w.tokenizer();
    let ids = tok
        .encode(&["A photo of a red circle.".to_string()], 20)
        .unwrap();
    let row = &ids[0];
    assert_eq!(row.len(), 20);
    assert_eq!(row[0], 0, "start token first");
    assert_eq!(
        row[1..6],
        tok.word_ids("a photo of a red circle").unwrap()[..5]
    );
    assert_eq!(row[7], tok.end_id());
    assert!(
        row[7..].iter().all(|&i| i == tok.end_id()),
        "padded with the end id"
    );
    let long = tok.encode(&["a ".repeat(30)], 20).unwrap();
    assert_eq!(long[0][19], tok.end_id());
    assert_eq!(long[0][18], tok.id("a").unwrap());
    let err = tok
        .encode(&["a photo of a unicorn".to_string()], 20)
        .unwrap_err();
    assert!(err.to_string().contains("unicorn"), "{err}");
    assert!(w
        .teacher()
        .text_features(&["a unicorn".to_string()])
        .is_err());
    assert!(tok.vocab_size() > 30);
    let text = w.dtext().batch(&[0, 1, 2], &Device::Cpu).unwrap();
    assert_eq!(text.token_ids.dims(), &[3, 20]);
    assert_eq!(text.teacher.dims(), &[3, w.teacher().embed_dim()]);
}

#[test]
fn world_command_writes_grids_and_captions() {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_spikeclip"))
        .args(["world", "--count", "5", "--seed", "3", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    common::assert_success(&status);
    let grid = image::open(dir.path().join("grid_unseen.png")).unwrap();
    // 5 images in a 3-column grid: 2 rows of 130-pixel tiles.
    assert_eq!((grid.width(), grid.height()), (3 * 130, 2 * 130));
    let captions = std::fs::read_to_string(dir.path().join("captions.txt")).unwrap();
    assert_eq!(captions.lines().count(), 15, "three grids of five");
    let w = World::new(WorldConfig {
        seed: 3,
        ..Default::default()
    });
    let first = w.sample(Split::TestUnseen, 0).concept.name();
    assert!(
        captions.lines().nth(10).unwrap().ends_with(&first),
        "{captions}"
    );
}

#[test]
fn pretraining_shows_attributes_apart_and_no_held_out_pair() {
    let w = world(8);
    let dev = Device::Cpu;
    let batch = w.images(Split::Pretrain).batch(&all(400), &dev).unwrap();
    assert!(
        batch.labels.is_empty(),
        "the pre-training split is unlabelled"
    );
    assert!(w.images(Split::Pretrain).class_names().is_empty());
    let samples: Vec<Sample> = (0..400).map(|i| w.sample(Split::Pretrain, i)).collect();
    let count = |s: Subject| samples.iter().filter(|x| x.subject == s).count();
    // attribute_share 0.5: about 100 of each single-attribute kind, 200 objects.
    for (subject, lo, hi) in [
        (Subject::Object, 150, 250),
        (Subject::ColourSplash, 60, 140),
        (Subject::GreyShape, 60, 140),
    ] {
        let n = count(subject);
        assert!(n >= lo && n <= hi, "{subject:?}: {n} of 400");
    }
    assert!(samples
        .iter()
        .filter(|x| x.subject == Subject::Object)
        .all(|x| !x.concept.is_unseen()));
    // The teacher sees only what is shown: a splash means its colour, not its shape.
    let teacher = w.teacher();
    let text = |t: &str| Tensor::new(teacher.text_embedding(t).unwrap(), &dev).unwrap();
    let cos = |a: &Tensor, b: &Tensor| {
        let n = |x: &Tensor| x.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        (a * b)
            .unwrap()
            .sum_all()
            .unwrap()
            .div(&(n(a) * n(b)).unwrap())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let splash = samples
        .iter()
        .position(|x| x.subject == Subject::ColourSplash)
        .unwrap();
    let feature = batch.teacher.get(splash).unwrap();
    let concept = samples[splash].concept;
    let colour = text(COLOURS[concept.colour].0);
    let shape = text(SHAPES[concept.shape]);
    assert!(cos(&feature, &colour) > 0.7, "{}", cos(&feature, &colour));
    assert!(
        cos(&feature, &shape).abs() < 0.3,
        "{}",
        cos(&feature, &shape)
    );
}
