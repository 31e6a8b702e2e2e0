//! The engine's tests: the tract backend's plans and threads on a miniature ViT, and the
//! activations.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use super::backend::{Backend, RawOutputs};
use super::model::{MetaOverrides, ModelFile, ModelMeta};
use super::settings::{Parallel, TractPlans, TractSettings, TractWait};
use super::tract::{with_threads_awake, Plans, TractBackend, AWAKE_IDLE};
use super::*;
use crate::accel::Rewrites;
use crate::testgraph::{floats, init, int, ints, model_bytes, node, value};
use tract_onnx::pb;

/// Side of the test images.
const S: usize = 4;
const CLASSES: usize = 5;

/// A ViT in miniature: 2×2 patches embedded by a convolution, tokens transposed, a linear
/// layer on each token, mean pooling, a head; `logits` and `probabilities` `[batch, 5]`.
/// The batch is `fixed`, or the symbol `batch`.
fn tiny_vit(fixed: Option<i64>) -> Vec<u8> {
    let (s, c) = (S as i64, CLASSES as i64);
    let shape = pb::TensorProto {
        name: "tokens_shape".into(),
        dims: vec![3],
        data_type: pb::tensor_proto::DataType::Int64 as i32,
        int64_data: vec![0, 8, -1],
        ..Default::default()
    };
    let graph = pb::GraphProto {
        name: "tiny".into(),
        node: vec![
            node(
                "Conv",
                &["pixel_values", "patch_w", "patch_b"],
                "patches",
                vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])],
            ),
            node("Reshape", &["patches", "tokens_shape"], "flat", vec![]),
            node(
                "Transpose",
                &["flat"],
                "tokens",
                vec![ints("perm", &[0, 2, 1])],
            ),
            node("MatMul", &["tokens", "mlp_w"], "mlp", vec![]),
            node("Add", &["mlp", "mlp_b"], "mlp_out", vec![]),
            node("Relu", &["mlp_out"], "act", vec![]),
            node(
                "ReduceMean",
                &["act"],
                "pooled",
                vec![ints("axes", &[1]), int("keepdims", 0)],
            ),
            node("MatMul", &["pooled", "head_w"], "head", vec![]),
            node("Add", &["head", "head_b"], "logits", vec![]),
            node(
                "Softmax",
                &["logits"],
                "probabilities",
                vec![int("axis", -1)],
            ),
        ],
        initializer: vec![
            init("patch_w", &[8, 3, 2, 2], 1),
            init("patch_b", &[8], 2),
            shape,
            init("mlp_w", &[8, 8], 3),
            init("mlp_b", &[8], 4),
            init("head_w", &[8, c], 5),
            init("head_b", &[c], 6),
        ],
        input: vec![value("pixel_values", &[fixed, Some(3), Some(s), Some(s)])],
        output: vec![
            value("logits", &[fixed, Some(c)]),
            value("probabilities", &[fixed, Some(c)]),
        ],
        ..Default::default()
    };
    model_bytes(graph, 17)
}

fn write_model(dir: &Path, fixed: Option<i64>) -> (PathBuf, ModelMeta) {
    let path = dir.join(format!("tiny-{fixed:?}.onnx"));
    std::fs::write(&path, tiny_vit(fixed)).unwrap();
    let overrides = MetaOverrides {
        input_size: Some(S),
        ..Default::default()
    };
    let meta = ModelMeta::from_file(&ModelFile::read(&path).unwrap(), &overrides).unwrap();
    assert_eq!(meta.fixed_batch, fixed.map(|b| b as usize));
    (path, meta)
}

fn images(seed: u64, n: usize) -> Vec<f32> {
    floats(seed, n * 3 * S * S)
}

fn assert_same(what: &str, a: &RawOutputs, b: &RawOutputs, n: usize) {
    for (part, x, y) in [
        ("logits", &a.logits, &b.logits),
        ("probabilities", &a.probabilities, &b.probabilities),
    ] {
        let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
        assert_eq!(x.len(), n * CLASSES, "{what} {part}");
        assert_eq!(y.len(), n * CLASSES, "{what} {part}");
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            assert!(
                p.is_finite() && (p - q).abs() <= 1e-5,
                "{what} {part}[{i}]: {p} vs {q}"
            );
        }
    }
    assert_eq!((a.classes, b.classes), (CLASSES, CLASSES), "{what}");
}

/// Runs `f` on another thread and fails if it has not returned within 60 s (a hang).
fn within_a_minute<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what}: no answer within 60 s"))
}

/// Sums 0..n over the current pool, split as finely as rayon splits (joins within joins,
/// whose waiting threads run other jobs: the helpers among them).
fn pool_sum(n: u32) -> u64 {
    use rayon::prelude::*;
    (0..n)
        .into_par_iter()
        .with_max_len(1)
        .map(|i| u64::from(i) * u64::from(i))
        .sum()
}

#[test]
fn threads_kept_awake_end_with_the_work_they_serve() {
    use std::sync::Arc;
    let expect: u64 = (0..20_000u64).map(|i| i * i).sum();
    for (threads, helpers) in [(2, 1), (2, 5), (3, 2), (4, 3), (1, 2)] {
        let what = format!("{threads} threads, {helpers} helpers");
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap(),
        );
        let (p, w) = (pool.clone(), what.clone());
        let sums = within_a_minute(&what, move || {
            (0..20)
                .map(|_| with_threads_awake(&p, helpers, || pool_sum(20_000)))
                .collect::<Vec<_>>()
        });
        assert!(sums.iter().all(|&s| s == expect), "{w}: {sums:?}");
        // A pass that sleeps past the helpers' patience, then works: they gave up (the
        // call returns) and the work is still done.
        let p = pool.clone();
        let sum = within_a_minute(&what, move || {
            with_threads_awake(&p, helpers, || {
                std::thread::sleep(AWAKE_IDLE * 3);
                pool_sum(20_000)
            })
        });
        assert_eq!(sum, expect, "{what}");
        // A pass that panics: the panic reaches the caller, the helpers stop, and the
        // pool runs the next pass.
        let p = pool.clone();
        let caught = within_a_minute(&what, move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                with_threads_awake(&p, helpers, || {
                    let _ = pool_sum(1000);
                    panic!("a failing pass")
                })
            }))
            .is_err()
        });
        assert!(caught, "{what}: the panic was lost");
        let p = pool.clone();
        let sum = within_a_minute(&what, move || p.install(|| pool_sum(20_000)));
        assert_eq!(sum, expect, "{what}: after a panic");
    }
}

#[test]
fn the_one_image_plan_matches_the_symbolic_plan() {
    let dir = tempfile::tempdir().unwrap();
    let (path, meta) = write_model(dir.path(), None);
    for (threads, parallel) in [
        (1, Parallel::Ops),
        (2, Parallel::Images),
        (2, Parallel::Auto),
        (2, Parallel::Ops),
        (3, Parallel::Ops),
    ] {
        let mut one = TractBackend::load(
            &path,
            &meta,
            threads,
            parallel,
            TractSettings {
                plans: TractPlans::Image,
                rewrites: Rewrites::All,
                kernels: crate::kernels::select::Path::Auto,
                wait: TractWait::Spin,
            },
        )
        .unwrap();
        // The two wait modes too: the threads' waiting changes no number.
        let mut sym = TractBackend::load(
            &path,
            &meta,
            threads,
            parallel,
            TractSettings {
                plans: TractPlans::Symbolic,
                rewrites: Rewrites::All,
                kernels: crate::kernels::select::Path::Auto,
                wait: TractWait::Sleep,
            },
        )
        .unwrap();
        assert!(matches!(one.plans, Plans::Image(_)));
        assert!(matches!(sym.plans, Plans::Whole(_, None)));
        assert!(
            one.describe().contains("a plan for one image"),
            "{}",
            one.describe()
        );
        assert!(
            sym.describe().contains("symbolic batch"),
            "{}",
            sym.describe()
        );
        for (k, n) in [1, 2, 3, 5, 1].into_iter().enumerate() {
            let x = images(k as u64, n);
            let what = format!("{threads} threads, {parallel:?}, batch {n}");
            assert_same(&what, &one.run(&x, n).unwrap(), &sym.run(&x, n).unwrap(), n);
        }
    }
    // Rows do not depend on the batch they are run in, and on their own image only.
    let mut one = TractBackend::load(
        &path,
        &meta,
        1,
        Parallel::Ops,
        TractSettings {
            plans: TractPlans::Image,
            rewrites: Rewrites::All,
            kernels: crate::kernels::select::Path::Auto,
            wait: TractWait::Spin,
        },
    )
    .unwrap();
    let x = images(9, 3);
    let three = one.run(&x, 3).unwrap().logits.unwrap();
    let last = one.run(&x[2 * 3 * S * S..], 1).unwrap().logits.unwrap();
    assert_ne!(
        three[..CLASSES],
        three[CLASSES..2 * CLASSES],
        "the model ignores its input"
    );
    assert_eq!(three[2 * CLASSES..], last[..]);
}

#[test]
fn fixed_batches_are_not_split() {
    let dir = tempfile::tempdir().unwrap();
    let (path, meta) = write_model(dir.path(), None);
    let mut sym = TractBackend::load(
        &path,
        &meta,
        2,
        Parallel::Images,
        TractSettings {
            plans: TractPlans::Symbolic,
            rewrites: Rewrites::All,
            kernels: crate::kernels::select::Path::Auto,
            wait: TractWait::Spin,
        },
    )
    .unwrap();
    // A file with a fixed batch of 2: one plan, and the batch is not split over the threads.
    let (fixed_path, fixed_meta) = write_model(dir.path(), Some(2));
    let mut fixed = TractBackend::load(
        &fixed_path,
        &fixed_meta,
        2,
        Parallel::Images,
        TractSettings {
            plans: TractPlans::Image,
            rewrites: Rewrites::All,
            kernels: crate::kernels::select::Path::Auto,
            wait: TractWait::Spin,
        },
    )
    .unwrap();
    assert!(matches!(fixed.plans, Plans::Whole(_, Some(2))));
    assert!(
        fixed.describe().contains("fixes the batch at 2"),
        "{}",
        fixed.describe()
    );
    let x = images(13, 2);
    let a = fixed.run(&x, 2).unwrap();
    assert_same("fixed batch", &a, &sym.run(&x, 2).unwrap(), 2);
}

#[test]
fn softmax_and_temperature() {
    let p = activate(&[0.0, 0.0, 2.0f32.ln()], 3, Task::MultiClass, 1.0);
    assert!((p[2] - 0.5).abs() < 1e-6 && (p[0] - 0.25).abs() < 1e-6);
    let p = activate(&[0.0, 2.0], 2, Task::Binary, 2.0);
    let want = 1.0 / (1.0 + (-1.0f32).exp());
    assert!((p[1] - want).abs() < 1e-6);
    let p = activate(&[0.0, 100.0], 2, Task::MultiLabel, 1.0);
    assert!((p[0] - 0.5).abs() < 1e-6 && p[1] > 0.999);
}
