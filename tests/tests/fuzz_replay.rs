//! Replays the fuzz targets' inputs on stable Rust, through the functions the targets call
//! (`mae_tests::fuzz`): the committed seeds (each must be accepted: they are valid files), the
//! corpus the campaigns kept (`fuzz/corpus/`) and every finding (`fuzz/regressions/`), which
//! must end in an answer, not a panic. `scripts/fuzz.sh` runs the campaigns themselves.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use mae_tests::{fuzz::TARGETS, workspace_root};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

#[test]
fn every_seed_is_accepted() {
    let root = workspace_root().join("fuzz/seeds");
    for (name, target) in TARGETS {
        let seeds = files(&root.join(name));
        assert!(!seeds.is_empty(), "no seeds for the {name} target");
        for s in seeds {
            let bytes = std::fs::read(&s).unwrap();
            assert!(
                target(&bytes),
                "{name}: the seed {} is refused",
                s.display()
            );
        }
    }
}

#[test]
fn seeds_corpora_and_regressions_replay_without_a_panic() {
    let root = workspace_root().join("fuzz");
    let mut replayed = 0;
    for (name, target) in TARGETS {
        for dir in ["seeds", "corpus", "regressions"] {
            for f in files(&root.join(dir).join(name)) {
                let bytes = std::fs::read(&f).unwrap();
                // The answer may be yes or no; reaching it at all is the test.
                let _ = target(&bytes);
                replayed += 1;
            }
        }
    }
    eprintln!("replayed {replayed} inputs");
    assert!(
        replayed >= TARGETS.len(),
        "only {replayed} inputs under fuzz/corpus and fuzz/regressions"
    );
}

/// The campaigns' findings in the DICOM and image decoders, each refused for its reason, without
/// a panic (DICOM is decoded without its guard):
/// - a declared element length far beyond the file (2.7 GB and 1.4 GB in a few hundred bytes)
///   once made the parser reserve that much before refusing; the length check names it now;
/// - a Bits Stored of 0 (or above Bits Allocated) reached an assertion in dicom-rs' lookup
///   tables; it is refused before them now;
/// - a numeric element whose length is not a whole number of values (Samples per Pixel as SL
///   with 2 bytes) left the parser two bytes off, where the next bytes read as a 1.3 GB length;
/// - a meta group length longer than the meta elements: the parser reads on by that length, so
///   the data set starts later than where the meta group's last element ends;
/// - a 556-byte JPEG declaring 10756×18761 pixels took 4 s and 800 MB to decode; images over
///   2²⁶ pixels are refused by their declared size now.
#[test]
fn decoder_findings_are_refused_for_their_reason() {
    let expected = [
        ("oom-d2765f08", "bytes where the file has"),
        ("timeout-15ad30e1", "bytes where the file has"),
        ("crash-395184df", "Bits Stored"),
        ("crash-be6b682d", "Bits Stored"),
        ("timeout-afbbad0a", "not a whole number of 4-byte values"),
        ("timeout-279f6a50", "bytes where the file has"),
        ("timeout-b6bf7236", "over the limit of 67108864 pixels"),
    ];
    let root = workspace_root().join("fuzz/regressions");
    let mut seen = 0;
    for dir in ["dicom", "image"] {
        for f in files(&root.join(dir)) {
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            let (_, reason) = expected
                .iter()
                .find(|(prefix, _)| name.starts_with(prefix))
                .unwrap_or_else(|| panic!("{dir}/{name}: add its expected refusal here"));
            let bytes = std::fs::read(&f).unwrap();
            let err = if dir == "dicom" {
                mae_models::input::dicom::decode_unguarded(&bytes).unwrap_err()
            } else {
                mae_models::input::decode(&bytes, &f)
                    .unwrap_err()
                    .to_string()
            };
            assert!(err.contains(reason), "{dir}/{name}: {err}");
            seen += 1;
        }
    }
    assert_eq!(seen, expected.len(), "regressions found");
}
