use spikeclip::data::stl10;

#[test]
fn stl10_planes_are_transposed_and_labels_shifted() {
    let dir = tempfile::tempdir().unwrap();
    // One image whose stored byte at (col, row) of channel c is (c*7 + col*3 + row) mod 251.
    let mut x = Vec::new();
    for c in 0..3usize {
        for col in 0..96usize {
            for row in 0..96usize {
                x.push(((c * 7 + col * 3 + row) % 251) as u8);
            }
        }
    }
    std::fs::write(dir.path().join("test_X.bin"), &x).unwrap();
    std::fs::write(dir.path().join("test_y.bin"), [10u8]).unwrap();
    let images = stl10::load(dir.path(), false).unwrap();
    assert_eq!(images.labels, vec![9]);
    let (c, row, col) = (2usize, 5usize, 40usize);
    assert_eq!(
        images.pixels[c * 96 * 96 + row * 96 + col],
        ((c * 7 + col * 3 + row) % 251) as u8
    );
}

#[test]
fn stl10_bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train_X.bin"), vec![0u8; 3 * 96 * 96 - 1]).unwrap();
    std::fs::write(dir.path().join("train_y.bin"), [1u8]).unwrap();
    let err = format!("{:#}", stl10::load(dir.path(), true).unwrap_err());
    assert!(
        err.contains("train_X.bin") && err.contains("truncated"),
        "{err}"
    );

    std::fs::write(dir.path().join("train_X.bin"), vec![0u8; 3 * 96 * 96]).unwrap();
    std::fs::write(dir.path().join("train_y.bin"), [0u8]).unwrap();
    let err = format!("{:#}", stl10::load(dir.path(), true).unwrap_err());
    assert!(
        err.contains("train_y.bin") && err.contains("not in 1..=10"),
        "{err}"
    );

    let err = format!("{:#}", stl10::load(dir.path(), false).unwrap_err());
    assert!(err.contains("test_X.bin"), "{err}");
}
