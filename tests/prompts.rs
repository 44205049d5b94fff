use std::path::PathBuf;

use spikeclip::data::prompts::PromptSet;

/// The shared data lives beside the repository in CI and under /work/shared elsewhere.
fn shared_prompts() -> PathBuf {
    let beside = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/clip_prompts.json"
    ));
    if beside.exists() {
        beside
    } else {
        PathBuf::from("/work/shared/data/clip_prompts.json")
    }
}

#[test]
fn dtext_of_all_27_datasets_matches_python_count() {
    let set = PromptSet::load(&shared_prompts()).unwrap();
    assert_eq!(set.datasets.len(), 27);
    // Counted in Python over the same file: 115,708 class x template pairs (the paper's
    // figure) of which 114,311 are distinct sentences.
    let dtext = set.dtext(&[]).unwrap();
    assert_eq!(dtext.len(), 114_311);
    assert!(dtext.iter().all(|s| !s.contains("{}")));
}

#[test]
fn synonyms_load_and_bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("p.json");
    std::fs::write(
        &good,
        r#"{"datasets":{"a":{"classes":["cat",["dog","puppy"]],"templates":["a {}.","{}!","a {}."]}}}"#,
    )
    .unwrap();
    let set = PromptSet::load(&good).unwrap();
    assert_eq!(set.datasets["a"].classes[1], vec!["dog", "puppy"]);
    assert_eq!(
        set.dtext(&["a".into()]).unwrap(),
        vec!["a cat.", "cat!", "a dog.", "dog!"]
    );
    assert!(set.dtext(&["b".into()]).is_err());

    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"datasets":{"a":{"classes":["cat"],"templates":["no slot"]}}}"#,
    )
    .unwrap();
    let err = format!("{:#}", PromptSet::load(&bad).unwrap_err());
    assert!(err.contains("bad.json") && err.contains("no slot"), "{err}");
    let missing = dir.path().join("missing.json");
    let err = format!("{:#}", PromptSet::load(&missing).unwrap_err());
    assert!(err.contains("missing.json"), "{err}");
}
