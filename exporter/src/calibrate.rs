//! Calibration for static int8 quantisation: images from a data set are run through the
//! float32 graph with tract, and the range (min, max) of each linear layer's input is recorded.
//! The int8 graph then quantises those inputs with fixed uint8 parameters instead of measuring
//! them on every call.
//!
//! Images are taken evenly spaced over the data (all classes of an ImageFolder tree, the whole
//! split of a MedMNIST file) and preprocessed as `mae-run` does for evaluation, so that the
//! ranges are those the deployed model will see.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use mae_models::checkpoint::StateDict;
use mae_models::imaging::preprocess_eval;
use mae_models::input::{is_image_file, ImageFolder};
use mae_models::preprocess::PreprocessSpec;
use mae_models::VitConfig;
use tract_onnx::prelude::*;

use crate::onnx;
use crate::onnx::vit::{self, GraphOptions, Output, Precision};

/// Where the calibration images come from.
#[derive(Debug, Clone)]
pub struct CalibrationSource<'a> {
    /// A MedMNIST `.npz` file, an ImageFolder tree, or a folder of images.
    pub path: &'a Path,
    /// Split of a `.npz` file.
    pub split: &'a str,
    /// How many images to use (fewer if the data has fewer).
    pub images: usize,
}

/// The calibrated ranges and what they came from.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// `(min, max)` of each linear layer's input, by layer.
    pub ranges: BTreeMap<String, (f32, f32)>,
    /// Images used.
    pub images: usize,
    /// Images available in the data.
    pub available: usize,
    pub seconds: f64,
}

/// Images run through the graph at once.
const BATCH: usize = 8;

/// Reads the calibration images of `src`, preprocessed as `spec` says: `[n, 3, s, s]` values.
pub fn load_images(
    src: &CalibrationSource<'_>,
    spec: &PreprocessSpec,
) -> anyhow::Result<(Vec<f32>, usize, usize)> {
    ensure!(src.images > 0, "--calibration-images must be at least 1");
    let path = src.path;
    let mut pixels = Vec::new();
    let (used, available);
    if path.is_dir() {
        let files = folder_images(path)?;
        ensure!(
            !files.is_empty(),
            "--calibration-data {}: no images in the folder or its class folders",
            path.display()
        );
        available = files.len();
        let picks = spread(available, src.images);
        used = picks.len();
        for i in picks {
            let img = mae_models::input::load(&files[i])?;
            pixels.extend(preprocess_eval(&img, spec));
        }
    } else if path.extension().is_some_and(|e| e == "npz") {
        let split = mae_models::npz::read_split(path, src.split)
            .with_context(|| format!("--calibration-data {}", path.display()))?;
        ensure!(
            !split.images.is_empty(),
            "--calibration-data {}: split '{}' has no images",
            path.display(),
            src.split
        );
        available = split.images.len();
        let picks = spread(available, src.images);
        used = picks.len();
        for i in picks {
            pixels.extend(preprocess_eval(&split.images[i], spec));
        }
    } else if path.exists() {
        bail!(
            "--calibration-data {}: expected a MedMNIST .npz file or a folder of images",
            path.display()
        );
    } else {
        bail!(
            "--calibration-data {}: no such file or folder",
            path.display()
        );
    }
    Ok((pixels, used, available))
}

/// The images of an ImageFolder tree (in torchvision's order), or of a plain folder of images
/// (sorted by name) when it has no subfolders.
fn folder_images(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let cannot = || {
        format!(
            "--calibration-data {}: cannot read the folder",
            path.display()
        )
    };
    let entries = std::fs::read_dir(path)
        .with_context(cannot)?
        .collect::<Result<Vec<_>, _>>()
        .with_context(cannot)?;
    if entries.iter().any(|e| e.path().is_dir()) {
        let folder = ImageFolder::open(path)?;
        return Ok(folder.samples.into_iter().map(|(f, _)| f).collect());
    }
    let mut files: Vec<PathBuf> = entries
        .into_iter()
        .map(|e| e.path())
        .filter(|f| is_image_file(f))
        .collect();
    files.sort();
    Ok(files)
}

/// `k` indices spread evenly over `0..n` (all of them when `k >= n`).
fn spread(n: usize, k: usize) -> Vec<usize> {
    if k >= n {
        return (0..n).collect();
    }
    (0..k).map(|i| i * n / k).collect()
}

/// Runs the calibration images of `src` through the float32 graph of `cfg` and records the
/// range of every linear layer's input.
pub fn calibrate(
    cfg: &VitConfig,
    tensors: &StateDict,
    opset: i64,
    output: Output,
    spec: &PreprocessSpec,
    src: &CalibrationSource<'_>,
) -> anyhow::Result<Calibration> {
    let started = Instant::now();
    ensure!(
        cfg.in_chans == 3,
        "calibration reads RGB images; this model takes {} channels",
        cfg.in_chans
    );
    let (pixels, used, available) = load_images(src, spec)?;
    let opts = GraphOptions {
        opset,
        precision: Precision::Fp32,
        output,
        preprocessing: None,
        activation_ranges: None,
        tap_linear_inputs: true,
        explain: Default::default(),
    };
    let built = vit::build_traced(cfg, tensors, &opts)
        .context("cannot build the float32 graph for calibration")?;
    let taps = built.linear_inputs;
    let first_tap = built.graph.output.len() - taps.len();
    let model = onnx::model(built.graph, opset, Vec::new(), "calibration");
    let bytes = onnx::encode(&model);
    drop(model);

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads > 1 {
        tract_linalg::multithread::set_default_executor(
            tract_linalg::multithread::Executor::multithread(threads),
        );
    }
    let s = spec.input_size;
    let plan = (|| -> TractResult<_> {
        let mut m = tract_onnx::onnx().model_for_read(&mut bytes.as_slice())?;
        let batch: TDim = m.sym("batch").into();
        let shape: TVec<TDim> = tvec![batch, 3.into(), (s as i64).into(), (s as i64).into()];
        m.set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))?;
        m.into_optimized()?.into_runnable()
    })()
    .context("tract cannot load the float32 graph for calibration")?;
    drop(bytes);

    let per_image = 3 * s * s;
    let mut ranges = vec![(f32::INFINITY, f32::NEG_INFINITY); taps.len()];
    let mut done = 0;
    let mut err = std::io::stderr();
    let progress = err.is_terminal();
    for chunk in pixels.chunks(BATCH * per_image) {
        let n = chunk.len() / per_image;
        let input = Tensor::from_shape(&[n, 3, s, s], chunk)?;
        let outputs = plan
            .run(tvec!(input.into()))
            .context("tract: calibration inference failed")?;
        for (k, range) in ranges.iter_mut().enumerate() {
            let t = outputs
                .get(first_tap + k)
                .context("tract: a calibration output is missing")?
                .cast_to::<f32>()?;
            for &v in t.try_as_plain_ram()?.as_slice::<f32>()? {
                if v.is_finite() {
                    range.0 = range.0.min(v);
                    range.1 = range.1.max(v);
                }
            }
        }
        done += n;
        if progress {
            let _ = write!(err, "\rcalibrating: {done}/{used} images");
            let _ = err.flush();
        }
    }
    if progress {
        let _ = writeln!(err);
    }
    let mut out = BTreeMap::new();
    for ((layer, value), (lo, hi)) in taps.into_iter().zip(ranges) {
        ensure!(
            lo <= hi,
            "calibration: the input of {layer} ({value}) had no finite value on any image"
        );
        out.insert(layer, (lo, hi));
    }
    Ok(Calibration {
        ranges: out,
        images: used,
        available,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_spread_over_the_data() {
        assert_eq!(spread(10, 4), vec![0, 2, 5, 7]);
        assert_eq!(spread(3, 8), vec![0, 1, 2]);
        assert_eq!(spread(5, 5), vec![0, 1, 2, 3, 4]);
        let p = spread(1000, 7);
        assert_eq!(p.len(), 7);
        assert!(p.windows(2).all(|w| w[0] < w[1]));
    }
}
