//! The reproduction suite's pieces on the built-in world, and `spikeclip reproduce --quick`
//! end to end.

use std::process::Command;

mod common;

use candle_core::{Device, Tensor};
use spikeclip::data::world::{Split, World};
use spikeclip::data::ImageFeatureSet;
use spikeclip::experiments::lab::{Arch, Lab};
use spikeclip::experiments::reproduce::{Experiment, ReproConfig};
use spikeclip::experiments::robustness::{LabelSettings, Robustness};
use spikeclip::experiments::subsets::Mixture;
use spikeclip::experiments::weights::Snapshot;
use spikeclip::model::config::{ReadoutKind, TextEncoderKind};
use spikeclip::recipe::student::trainable;

fn lab(dir: &std::path::Path) -> Lab {
    Lab::new(ReproConfig::quick(0).demo, dir, false, &Device::Cpu).unwrap()
}

#[test]
fn world_label_sets_are_seeded_and_never_reuse_an_original() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab(dir.path());
    let rob = Robustness::world(&lab).unwrap();
    let originals = World::class_names();
    let sets = rob.label_sets(&[0, 1], &LabelSettings::paper()).unwrap();
    let again = rob.label_sets(&[0, 1], &LabelSettings::paper()).unwrap();
    assert_eq!(sets.len(), 8);
    for (set, same) in sets.iter().zip(&again) {
        assert_eq!(set.prompts, same.prompts, "{}", set.column);
        for prompts in &set.prompts {
            let names: Vec<&String> = prompts.classes.iter().map(|c| &c[0]).collect();
            let unique: std::collections::BTreeSet<_> = names.iter().collect();
            assert_eq!(
                unique.len(),
                names.len(),
                "{}: duplicate labels",
                set.column
            );
            let kept = names.iter().filter(|n| originals.contains(n)).count();
            match set.column.as_str() {
                "x8 labels" => assert_eq!((names.len(), kept), (192, 24)),
                "100% replaced" => assert_eq!((names.len(), kept), (24, 0)),
                "20% replaced" => assert_eq!(kept, 24 - 5),
                _ => {}
            }
        }
    }
    // Replacements are synonyms: every renamed label shares a word with its original.
    for (orig, new) in originals.iter().zip(&rob.renamed_all().classes) {
        assert!(
            orig.split(' ').any(|w| new[0].split(' ').any(|v| v == w)),
            "{orig} -> {}",
            new[0]
        );
    }
}

#[test]
fn the_mean_readout_has_no_trainable_weights_and_tdw_has() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab(dir.path());
    let names = |readout| -> Vec<String> {
        let s = lab
            .build(Arch::Spiking {
                readout,
                text: TextEncoderKind::Mlp,
            })
            .unwrap();
        trainable(s.as_ref(), "")
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    };
    let tdw = names(ReadoutKind::Tdw);
    let mean = names(ReadoutKind::Mean);
    let readout = |v: &[String]| v.iter().filter(|n| n.contains("weights_tensor")).count();
    assert_eq!(readout(&tdw), 2, "{tdw:?}");
    assert_eq!(readout(&mean), 0);
    assert_eq!(tdw.len(), mean.len() + 2);
}

#[test]
fn table5_switches_only_the_text_tower_to_the_spiking_transformer() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab(dir.path());
    let params = |text| -> Vec<(String, usize)> {
        let arch = Arch::Spiking {
            readout: ReadoutKind::Tdw,
            text,
        };
        let s = lab.build(arch).unwrap();
        let counted: usize = trainable(s.as_ref(), "text.")
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        assert_eq!(counted, lab.config(arch).text_param_count());
        trainable(s.as_ref(), "")
            .into_iter()
            .map(|(n, v)| (n, v.elem_count()))
            .collect()
    };
    let (mlp, transformer) = (
        params(TextEncoderKind::Mlp),
        params(TextEncoderKind::Transformer),
    );
    let image = |v: &[(String, usize)]| -> Vec<(String, usize)> {
        v.iter()
            .filter(|(n, _)| n.starts_with("image."))
            .cloned()
            .collect()
    };
    assert_eq!(image(&mlp), image(&transformer));
    let blocks = |v: &[(String, usize)]| {
        v.iter()
            .filter(|(n, _)| n.starts_with("text.block."))
            .count()
    };
    assert_eq!(blocks(&mlp), 0);
    assert!(blocks(&transformer) > 0, "{transformer:?}");
}

#[test]
fn without_pretraining_starts_from_init_and_lambda_changes_finetuning() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab(dir.path());
    let student = lab.build(Arch::spiking(&lab.demo.model)).unwrap();
    let s = student.as_ref();
    let init = Snapshot::take(s).unwrap();
    lab.distill_image(s, &lab.world.images(Split::Train), "pre")
        .unwrap();
    assert!(!init.matches(s, "image.").unwrap());
    assert!(init.matches(s, "text.").unwrap());
    let pretrained = Snapshot::take(s).unwrap();
    // What Table 3's "w/o pre-training" does before fine-tuning.
    init.restore(s, "image.").unwrap();
    assert!(init.matches(s, "").unwrap());
    pretrained.restore(s, "").unwrap();
    assert!(pretrained.matches(s, "").unwrap());
    let finetuned = |lambda: f64, name: &str| {
        pretrained.restore(s, "").unwrap();
        lab.finetune(s, lambda, name).unwrap();
        assert!(pretrained.matches(s, "text.").unwrap(), "text stays frozen");
        Snapshot::take(s).unwrap()
    };
    let plain = finetuned(0.0, "l0");
    finetuned(0.0, "l0b");
    assert!(
        plain.matches(s, "").unwrap(),
        "fine-tuning is deterministic"
    );
    finetuned(1.0, "l1");
    assert!(
        !plain.matches(s, "image.").unwrap(),
        "lambda changes training"
    );
}

#[test]
fn mixtures_take_the_chosen_items_of_each_set() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab(dir.path());
    let train = lab.world.images(Split::Pretrain);
    let unseen = lab.world.images(Split::TestUnseen);
    let mix = Mixture::new(vec![(&train, 0..3), (&unseen, 5..7)]).unwrap();
    assert_eq!(mix.len(), 5);
    assert!(mix.class_names().is_empty(), "a mixture is unlabelled");
    let dev = Device::Cpu;
    let batch = mix.batch(&[4, 0, 3], &dev).unwrap();
    let direct_train = train.batch(&[0], &dev).unwrap();
    let direct_unseen = unseen.batch(&[6, 5], &dev).unwrap();
    let expected = Tensor::cat(&[&direct_train.teacher, &direct_unseen.teacher], 0).unwrap();
    let diff = common::max_abs_diff(&batch.teacher, &expected);
    assert_eq!(diff, 0.0, "items grouped by set, in order");
    assert!(batch.labels.is_empty());
    assert_eq!(batch.inputs.dims()[0], 3);
    assert!(mix.batch(&[5], &dev).is_err());
    assert!(Mixture::new(vec![(&train, 0..train.len() + 1)]).is_err());
}

#[test]
fn experiment_lists_parse_and_refuse_unknown_names() {
    assert_eq!(
        Experiment::parse_list("table6, table2,table6").unwrap(),
        vec![Experiment::Table2, Experiment::Table6]
    );
    let err = Experiment::parse_list("table9").unwrap_err().to_string();
    assert!(err.contains("table9") && err.contains("figure6"), "{err}");
    assert_eq!(
        Experiment::parse_list("table5").unwrap(),
        vec![Experiment::Table5]
    );
}

#[test]
fn quick_reproduce_writes_every_table_and_claim() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("repro");
    let report = common::report_of(&["reproduce", "--quick"], &out);
    let tables = report["tables"].as_array().unwrap();
    let ids: Vec<&str> = tables.iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["table2", "table3", "table4", "table5", "table6", "table8", "figure6"]
    );
    for t in tables {
        let columns = t["columns"].as_array().unwrap().len();
        let rows = t["rows"].as_array().unwrap();
        assert!(!rows.is_empty(), "{}", t["id"]);
        for r in rows {
            let cells = r["cells"].as_array().unwrap();
            assert_eq!(cells.len(), columns, "{}", t["id"]);
            for c in cells {
                let v = c["mean"].as_f64().unwrap();
                assert!((0.0..=100.0).contains(&v), "{}: {v}", t["id"]);
            }
        }
    }
    let claims = report["claims"].as_array().unwrap();
    let tables_judged: std::collections::BTreeSet<&str> = claims
        .iter()
        .map(|c| c["table"].as_str().unwrap())
        .collect();
    assert_eq!(tables_judged.len(), 7, "{tables_judged:?}");
    assert!(claims.iter().all(|c| c["held"].is_boolean()));
    assert_eq!(report["chosen_labels"].as_array().unwrap().len(), 7);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("Table 2") && md.contains("red circle ->"),
        "{md}"
    );
    for png in ["figure6_size.png", "figure6_overlap.png"] {
        let img = image::open(out.join(png)).unwrap();
        assert!(img.width() > 100, "{png}");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_spikeclip"))
        .args(["reproduce", "--quick", "--only", "table7", "--out"])
        .arg(dir.path().join("bad"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("table7"));
}
