use spikeclip::data::cifar::Cifar;

/// A CIFAR-100 record: coarse label, fine label, then the R, G, B planes.
fn record100(coarse: u8, fine: u8, seed: u8) -> Vec<u8> {
    let mut r = vec![coarse, fine];
    r.extend((0..3072).map(|i| (i as u8).wrapping_mul(seed)));
    r
}

#[test]
fn cifar100_reads_fine_labels_and_planes() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = record100(3, 97, 1);
    bytes.extend(record100(19, 5, 7));
    std::fs::write(dir.path().join("test.bin"), &bytes).unwrap();
    let images = Cifar::Hundred.load(dir.path(), false).unwrap();
    assert_eq!(images.labels, vec![97, 5]);
    assert_eq!(images.pixels.len(), 2 * 3072);
    assert_eq!(&images.pixels[3072..], &record100(19, 5, 7)[2..]);
}

#[test]
fn truncated_corrupt_and_missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = record100(0, 1, 1);
    bytes.pop();
    std::fs::write(dir.path().join("train.bin"), &bytes).unwrap();
    let err = format!("{:#}", Cifar::Hundred.load(dir.path(), true).unwrap_err());
    assert!(
        err.contains("train.bin") && err.contains("truncated"),
        "{err}"
    );

    std::fs::write(dir.path().join("test.bin"), record100(0, 100, 1)).unwrap();
    let err = format!("{:#}", Cifar::Hundred.load(dir.path(), false).unwrap_err());
    assert!(
        err.contains("test.bin") && err.contains("out of range"),
        "{err}"
    );

    let err = format!("{:#}", Cifar::Ten.load(dir.path(), false).unwrap_err());
    assert!(err.contains("test_batch.bin"), "{err}");
}
