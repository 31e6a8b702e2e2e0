//! An ImageFolder tree read in place from a zip archive gives what the unzipped tree gives:
//! the same classes, samples in the same order with the same labels, the same skipped files and
//! the same decoded pixels, whether the archive stores or deflates its entries, holds the tree
//! at its top or inside one top folder, and lists its folders or not. Damaged archives are
//! errors naming the file.

#![allow(clippy::unwrap_used)]

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use mae_models::input::ImageFolder;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

/// Files of the generated tree, relative to its root: every image format, nested folders whose
/// order tells torchvision's walk from a plain sort (`sub-a` before `sub/deep`), a hidden class,
/// upper-case extensions, a file of another extension and one outside the class folders.
const FILES: [&str; 16] = [
    "train/B/q.webp",
    "train/a/10.bmp",
    "train/a/2.png",
    "train/a/notes.txt",
    "train/b/x.png",
    "train/b/sub/y.jpg",
    "train/b/sub-a/z.JPG",
    "train/b/sub/deep/w.tif",
    "train/b/sub/deep/v.PNG",
    "train/.hidden/h.pgm",
    "train/top.png",
    "val/a/v.png",
    "val/b/w.jpeg",
    "val/B/u.bmp",
    "val/.hidden/g.png",
    "test/a/only.png",
];

fn image_bytes(rel: &str, seed: u32) -> Vec<u8> {
    let ext = rel.rsplit('.').next().unwrap().to_lowercase();
    let (w, h) = (9 + seed % 5, 7 + seed % 3);
    let rgb = RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 29 + seed * 7) as u8,
            (y * 31 + seed * 13) as u8,
            ((x ^ y) * 17 + seed) as u8,
        ])
    });
    let img = DynamicImage::ImageRgb8(rgb);
    let (img, format) = match ext.as_str() {
        "png" => (img, ImageFormat::Png),
        "bmp" => (img, ImageFormat::Bmp),
        "jpg" | "jpeg" => (img, ImageFormat::Jpeg),
        "tif" => (img, ImageFormat::Tiff),
        "webp" => (img, ImageFormat::WebP),
        "pgm" => (DynamicImage::ImageLuma8(img.to_luma8()), ImageFormat::Pnm),
        _ => return format!("not an image {seed}").into_bytes(),
    };
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
    bytes
}

/// Writes the tree under `root`; returns each file's path and bytes.
fn write_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let files: Vec<(String, Vec<u8>)> = FILES
        .iter()
        .enumerate()
        .map(|(i, rel)| (rel.to_string(), image_bytes(rel, i as u32)))
        .collect();
    for (rel, bytes) in &files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    files
}

/// Zips `files` under `top` (`""` for the archive's top), in reverse order so that the
/// archive's order is not the tree's, with folder entries when `folders`.
fn write_zip(
    path: &Path,
    files: &[(String, Vec<u8>)],
    top: &str,
    method: CompressionMethod,
    folders: bool,
) {
    let mut zip = ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = SimpleFileOptions::default().compression_method(method);
    let mut dirs_done = Vec::new();
    for (rel, bytes) in files.iter().rev() {
        let name = format!("{top}{rel}");
        if folders {
            let mut dir = String::new();
            for part in name
                .split('/')
                .rev()
                .skip(1)
                .collect::<Vec<_>>()
                .iter()
                .rev()
            {
                dir.push_str(part);
                dir.push('/');
                if !dirs_done.contains(&dir) {
                    zip.add_directory(dir.clone(), opts).unwrap();
                    dirs_done.push(dir.clone());
                }
            }
        }
        zip.start_file(name, opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    if !top.is_empty() {
        // What macOS's archiver adds beside the one top folder.
        zip.start_file(format!("__MACOSX/{top}._x"), opts).unwrap();
        zip.write_all(b"resource fork").unwrap();
    }
    zip.finish().unwrap();
}

fn rel(root: &Path, paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| p.strip_prefix(root).unwrap().display().to_string())
        .collect()
}

/// Classes, samples (relative names and labels), skipped files and decoded pixels.
type Read = (
    Vec<String>,
    Vec<(String, usize)>,
    Vec<String>,
    Vec<String>,
    Vec<RgbImage>,
);

fn read(f: &ImageFolder) -> Read {
    let samples = f
        .samples
        .iter()
        .map(|(p, l)| (rel(&f.root, std::slice::from_ref(p)).remove(0), *l))
        .collect();
    let pixels = f.samples.iter().map(|(p, _)| f.load(p).unwrap()).collect();
    (
        f.classes.clone(),
        samples,
        rel(&f.root, &f.skipped),
        rel(&f.root, &f.outside),
        pixels,
    )
}

#[test]
fn zipped_tree_reads_as_the_unzipped_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let files = write_tree(&tree);
    let from_folder = ImageFolder::open(&tree.join("train")).unwrap();
    let (classes, samples, skipped, outside, _) = read(&from_folder);
    assert_eq!(classes, [".hidden", "B", "a", "b"]);
    assert_eq!(
        samples,
        [
            (".hidden/h.pgm".to_string(), 0),
            ("B/q.webp".into(), 1),
            ("a/10.bmp".into(), 2),
            ("a/2.png".into(), 2),
            ("b/x.png".into(), 3),
            ("b/sub/y.jpg".into(), 3),
            ("b/sub-a/z.JPG".into(), 3),
            ("b/sub/deep/v.PNG".into(), 3),
            ("b/sub/deep/w.tif".into(), 3),
        ]
    );
    assert_eq!(
        (skipped, outside),
        (vec!["a/notes.txt".into()], vec!["top.png".into()])
    );

    for split in ["train", "val", "test"] {
        let want = read(&ImageFolder::open(&tree.join(split)).unwrap());
        assert_eq!(
            read(&ImageFolder::open_split(&tree, split).unwrap()),
            want,
            "{split}: open_split on a folder"
        );
        for (top, method, folders) in [
            ("", CompressionMethod::Stored, false),
            ("", CompressionMethod::Deflated, true),
            ("data/", CompressionMethod::Stored, true),
            ("data/", CompressionMethod::Deflated, false),
        ] {
            let case = format!("{split} in '{top}', {method:?}, folder entries {folders}");
            let zip = tmp.path().join("data.zip");
            write_zip(&zip, &files, top, method, folders);
            let f = ImageFolder::open_split(&zip, split).unwrap();
            assert_eq!(f.root, zip.join(top).join(split), "{case}");
            assert!(f.archive.is_some(), "{case}");
            assert_eq!(read(&f), want, "{case}");
            // Each sample's bytes are the file's.
            for (p, _) in &f.samples {
                let on_disk = tree.join(p.strip_prefix(zip.join(top)).unwrap());
                assert_eq!(
                    f.read(p).unwrap(),
                    std::fs::read(on_disk).unwrap(),
                    "{case}"
                );
            }
        }
    }
}

#[test]
fn damaged_archives_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let files = write_tree(&tmp.path().join("tree"));
    let zip = tmp.path().join("data.zip");
    write_zip(&zip, &files, "", CompressionMethod::Stored, false);
    let bytes = std::fs::read(&zip).unwrap();

    for cut in [0, 10, bytes.len() / 2, bytes.len() - 5] {
        let p = tmp.path().join(format!("cut{cut}.zip"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let err = ImageFolder::open_split(&p, "train")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("cut{cut}.zip")) && err.contains("zip"),
            "{err}"
        );
    }

    // A byte changed inside a stored entry: the archive opens, the entry fails its checksum.
    let png = &files.iter().find(|(r, _)| r == "train/a/2.png").unwrap().1;
    let at = bytes
        .windows(png.len())
        .position(|w| w == &png[..])
        .unwrap();
    let mut damaged = bytes.clone();
    damaged[at + png.len() / 2] ^= 0x55;
    let p = tmp.path().join("damaged.zip");
    std::fs::write(&p, &damaged).unwrap();
    let f = ImageFolder::open_split(&p, "train").unwrap();
    let (sample, _) = f
        .samples
        .iter()
        .find(|(s, _)| s.ends_with("a/2.png"))
        .unwrap();
    let err = f.load(sample).unwrap_err().to_string();
    assert!(err.contains("damaged.zip/train/a/2.png"), "{err}");

    // No split folder where one is looked for.
    let err = ImageFolder::open_split(&zip, "extra")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data.zip") && err.contains("'extra/'"),
        "{err}"
    );
    let two_tops = tmp.path().join("two.zip");
    let mut w = ZipWriter::new(std::fs::File::create(&two_tops).unwrap());
    for name in ["x/train/a/1.png", "y/train/a/1.png"] {
        w.start_file(name, SimpleFileOptions::default()).unwrap();
        w.write_all(&files[2].1).unwrap();
    }
    w.finish().unwrap();
    let err = ImageFolder::open_split(&two_tops, "train")
        .unwrap_err()
        .to_string();
    assert!(err.contains("'x', 'y'"), "{err}");
    // A missing archive is an I/O error naming it.
    let err = ImageFolder::open_split(&tmp.path().join("none.zip"), "train")
        .unwrap_err()
        .to_string();
    assert!(err.contains("none.zip"), "{err}");
}
