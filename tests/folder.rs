use spikeclip::data::folder::{decode_rgb, ImageFolder};

fn tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for class in ["dog", "cat"] {
        std::fs::create_dir(dir.path().join(class)).unwrap();
        for i in 0..10 {
            image::RgbImage::from_pixel(4, 3, image::Rgb([i * 20, 1, 2]))
                .save(dir.path().join(class).join(format!("{i}.png")))
                .unwrap();
        }
    }
    std::fs::write(dir.path().join("cat").join("notes.txt"), "not an image").unwrap();
    dir
}

#[test]
fn scan_sorts_classes_and_split_is_seeded_and_stratified() {
    let dir = tree();
    let folder = ImageFolder::scan(dir.path()).unwrap();
    assert_eq!(folder.class_names, vec!["cat", "dog"]);
    assert_eq!(folder.items.len(), 20);
    let (train, test) = folder.split(7, 0.3).unwrap();
    assert_eq!((train.items.len(), test.items.len()), (14, 6));
    assert_eq!(test.items.iter().filter(|(_, l)| *l == 0).count(), 3);
    assert_eq!(folder.split(7, 0.3).unwrap().1, test);
    assert_ne!(folder.split(8, 0.3).unwrap().1, test);
    let mut all: Vec<_> = train.items.iter().chain(&test.items).cloned().collect();
    all.sort();
    assert_eq!(all, folder.items);
}

#[test]
fn unreadable_images_are_skipped_and_counted() {
    let dir = tree();
    std::fs::write(
        dir.path().join("dog").join("broken.jpg"),
        b"\xff\xd8 truncated",
    )
    .unwrap();
    let folder = ImageFolder::scan(dir.path()).unwrap();
    let (decoded, skipped) = decode_rgb(&folder.items);
    assert_eq!((decoded.len(), skipped), (20, 1));
    let empty = tempfile::tempdir().unwrap();
    let err = format!("{:#}", ImageFolder::scan(empty.path()).unwrap_err());
    assert!(err.contains(&empty.path().display().to_string()), "{err}");
}
