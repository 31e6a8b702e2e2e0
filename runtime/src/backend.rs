//! Inference backends behind one trait: tract (pure Rust, CPU, the default) and ONNX Runtime
//! (loaded at run time from `libonnxruntime.so`, CPU or the CUDA execution provider).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context};

use crate::model::ModelMeta;

/// Which engine runs the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// tract: pure Rust, CPU only, no shared library needed.
    Tract,
    /// ONNX Runtime through `libonnxruntime.so` (CPU or CUDA).
    Ort,
}

/// Where the graph runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    /// ONNX Runtime's CUDA execution provider; an error when it or the GPU is missing.
    Cuda,
    /// CUDA when available, else the CPU (with a warning).
    Auto,
}

/// The raw outputs of one batch.
#[derive(Debug, Clone, Default)]
pub struct RawOutputs {
    /// `[batch, classes]`, when the graph has a `logits` output.
    pub logits: Option<Vec<f32>>,
    /// `[batch, classes]`, when the graph has a `probabilities` output.
    pub probabilities: Option<Vec<f32>>,
    pub classes: usize,
}

impl RawOutputs {
    /// From the `(values, last dimension)` of the logits and probabilities outputs, each
    /// present or not; the class count is the logits', else the probabilities', else 0.
    pub fn new(logits: Option<(Vec<f32>, usize)>, probs: Option<(Vec<f32>, usize)>) -> Self {
        let classes = logits.as_ref().or(probs.as_ref()).map_or(0, |(_, c)| *c);
        Self {
            logits: logits.map(|(v, _)| v),
            probabilities: probs.map(|(v, _)| v),
            classes,
        }
    }
}

/// An engine with a loaded model. One instance is used from one thread at a time.
pub trait Backend: Send {
    /// `tract 0.23 (2 threads)`, `onnxruntime (CPUExecutionProvider, 2 threads)`.
    fn describe(&self) -> String;
    /// Runs `pixels` (`[batch, 3, s, s]`, normalised) through the graph.
    fn run(&mut self, pixels: &[f32], batch: usize) -> anyhow::Result<RawOutputs>;
}

/// Options of [`load`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub kind: BackendKind,
    pub device: Device,
    pub threads: usize,
    /// How tract spreads a batch over its threads.
    pub parallel: crate::Parallel,
    pub ort_lib: Option<PathBuf>,
}

/// Loads `path` into the chosen backend.
pub fn load(path: &Path, meta: &ModelMeta, opts: &LoadOptions) -> anyhow::Result<Box<dyn Backend>> {
    match opts.kind {
        BackendKind::Tract => {
            match opts.device {
                Device::Cpu => {}
                Device::Auto => {
                    tracing::info!("tract runs on the CPU (use --backend ort for CUDA)")
                }
                Device::Cuda => {
                    bail!("the tract backend runs on the CPU only; use --backend ort --device cuda")
                }
            }
            Ok(Box::new(tract_backend::TractBackend::load(
                path,
                meta,
                opts.threads,
                opts.parallel,
            )?))
        }
        BackendKind::Ort => Ok(Box::new(ort_backend::OrtBackend::load(path, meta, opts)?)),
    }
}

/// Finds the output index of each of `logits` and `probabilities` (the first output is taken
/// as logits when neither name is present).
fn output_roles(names: &[String]) -> (Option<usize>, Option<usize>) {
    let logits = names.iter().position(|n| n == "logits");
    let probs = names.iter().position(|n| n == "probabilities");
    if logits.is_none() && probs.is_none() {
        (Some(0), None)
    } else {
        (logits, probs)
    }
}

mod tract_backend {
    use super::*;
    use tract_onnx::prelude::*;

    pub struct TractBackend {
        plan: Arc<TypedRunnableModel>,
        size: usize,
        roles: (Option<usize>, Option<usize>),
        threads: usize,
        parallel: crate::Parallel,
    }

    impl TractBackend {
        pub fn load(
            path: &Path,
            meta: &ModelMeta,
            threads: usize,
            parallel: crate::Parallel,
        ) -> anyhow::Result<Self> {
            if threads > 1 {
                // tract's matrix products are single-threaded unless given a pool.
                tract_linalg::multithread::set_default_executor(
                    tract_linalg::multithread::Executor::multithread(threads),
                );
            }
            let s = meta.preprocess.input_size;
            let load = || -> TractResult<Arc<TypedRunnableModel>> {
                let mut model = tract_onnx::onnx().model_for_path(path)?;
                // Batch symbolic, image size concrete, whatever the file declares.
                let batch: TDim = match meta.fixed_batch {
                    Some(b) => (b as i64).into(),
                    None => model.sym("batch").into(),
                };
                let shape: TVec<TDim> =
                    tvec![batch, 3.into(), (s as i64).into(), (s as i64).into()];
                model.set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))?;
                model.into_optimized()?.into_runnable()
            };
            let plan = load().with_context(|| format!("tract cannot load {}", path.display()))?;
            Ok(Self {
                plan,
                size: s,
                roles: output_roles(&meta.output_names),
                threads,
                parallel,
            })
        }

        /// Runs `batch` images through the plan on this thread (its matrix products spread
        /// over the default executor's threads, if any).
        fn run_plan(&self, pixels: &[f32], batch: usize) -> anyhow::Result<TVec<TValue>> {
            let s = self.size;
            let input =
                Tensor::from_shape(&[batch, 3, s, s], pixels).context("tract: bad input tensor")?;
            self.plan
                .run(tvec!(input.into()))
                .context("tract: inference failed")
        }

        /// Runs the batch as `shares` parts at once, each on its own thread with a
        /// single-threaded plan, and joins their outputs in order.
        fn run_images(
            &self,
            pixels: &[f32],
            batch: usize,
            shares: usize,
        ) -> anyhow::Result<TVec<TValue>> {
            use tract_linalg::multithread::{multithread_tract_scope, Executor};
            let per_image = 3 * self.size * self.size;
            let mut bounds = Vec::with_capacity(shares);
            let mut start = 0;
            for k in 0..shares {
                let n = batch / shares + usize::from(k < batch % shares);
                bounds.push((start, n));
                start += n;
            }
            let parts: Vec<anyhow::Result<TVec<TValue>>> = std::thread::scope(|scope| {
                let handles: Vec<_> = bounds
                    .iter()
                    .map(|&(first, n)| {
                        let px = &pixels[first * per_image..(first + n) * per_image];
                        scope.spawn(move || {
                            multithread_tract_scope(Executor::SingleThread, || self.run_plan(px, n))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow!("tract: a worker thread failed")))
                    })
                    .collect()
            });
            let parts = parts.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
            let outputs = parts.first().map_or(0, |p| p.len());
            let mut joined = TVec::new();
            for o in 0..outputs {
                let pieces: Vec<Tensor> =
                    parts.iter().map(|p| p[o].clone().into_tensor()).collect();
                let t = Tensor::stack_tensors(0, &pieces).context("tract: joining the outputs")?;
                joined.push(t.into_tvalue());
            }
            Ok(joined)
        }
    }

    impl Backend for TractBackend {
        fn describe(&self) -> String {
            format!(
                "tract 0.23 (CPU, {} threads, parallel over {})",
                self.threads.max(1),
                match self.parallel {
                    crate::Parallel::Images => "images",
                    crate::Parallel::Ops => "operators",
                    crate::Parallel::Auto => "images in batches, operators for one image",
                }
            )
        }

        fn run(&mut self, pixels: &[f32], batch: usize) -> anyhow::Result<RawOutputs> {
            let by_images = match self.parallel {
                crate::Parallel::Images => true,
                crate::Parallel::Ops => false,
                crate::Parallel::Auto => batch >= 2,
            };
            let shares = self.threads.min(batch);
            let outputs = if by_images && shares >= 2 {
                self.run_images(pixels, batch, shares)?
            } else {
                self.run_plan(pixels, batch)?
            };
            let take = |i: Option<usize>| -> anyhow::Result<Option<(Vec<f32>, usize)>> {
                let Some(i) = i else { return Ok(None) };
                let t = outputs
                    .get(i)
                    .ok_or_else(|| anyhow!("tract: the model has no output {i}"))?;
                let t = t.cast_to::<f32>()?;
                let classes = t.shape().last().copied().unwrap_or(1);
                let v = t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
                Ok(Some((v, classes)))
            };
            Ok(RawOutputs::new(take(self.roles.0)?, take(self.roles.1)?))
        }
    }
}

mod ort_backend {
    use super::*;
    use ort::ep::ExecutionProvider;
    use ort::session::Session;
    use ort::value::Tensor;

    pub struct OrtBackend {
        session: Session,
        input_name: String,
        output_names: Vec<String>,
        roles: (Option<usize>, Option<usize>),
        size: usize,
        provider: &'static str,
        threads: usize,
        lib: PathBuf,
    }

    /// The process's ONNX Runtime environment (ONNX Runtime allows one per process), and the
    /// library it was loaded from.
    fn environment(
        lib: Option<&Path>,
    ) -> anyhow::Result<&'static (ort::environment::Environment, PathBuf)> {
        static ENV: OnceLock<(ort::environment::Environment, PathBuf)> = OnceLock::new();
        if let Some(env) = ENV.get() {
            return Ok(env);
        }
        let path = crate::ortlib::find(lib)?;
        let env = ort::init_from(&path)
            .map_err(|e| anyhow!("cannot load ONNX Runtime from {}: {e}", path.display()))?
            .with_name("mae-run")
            .with_telemetry(false)
            .build()
            .map_err(|e| anyhow!("cannot start ONNX Runtime ({}): {e}", path.display()))?;
        Ok(ENV.get_or_init(|| (env, path)))
    }

    impl OrtBackend {
        pub fn load(path: &Path, meta: &ModelMeta, opts: &LoadOptions) -> anyhow::Result<Self> {
            let (env, lib) = environment(opts.ort_lib.as_deref())?;
            let want_cuda = match opts.device {
                Device::Cpu => false,
                Device::Cuda | Device::Auto => {
                    let available = ort::ep::CUDA::is_available().unwrap_or(false);
                    if !available {
                        let msg = format!(
                            "the CUDA execution provider is not in the ONNX Runtime at {} \
                             (install the onnxruntime-gpu build, CUDA 13 and cuDNN 9)",
                            lib.display()
                        );
                        if opts.device == Device::Cuda {
                            bail!("--device cuda: {msg}");
                        }
                        tracing::warn!("--device auto: {msg}; running on the CPU");
                    }
                    available
                }
            };
            let threads = opts.threads.max(1);
            let builder = |cuda: bool| -> anyhow::Result<Session> {
                let e = |e: ort::Error<ort::session::builder::SessionBuilder>| anyhow!("{e}");
                let mut b = Session::builder(env)
                    .map_err(|e| anyhow!("{e}"))?
                    .with_intra_threads(threads)
                    .map_err(e)?
                    .with_inter_threads(1)
                    .map_err(e)?;
                if cuda {
                    // ort falls back to the CPU silently unless told not to.
                    b = b
                        .with_execution_providers([ort::ep::CUDA::default()
                            .build()
                            .error_on_failure()])
                        .map_err(e)?;
                }
                b.commit_from_file(path).map_err(|e| anyhow!("{e}"))
            };
            let (session, provider) = match builder(want_cuda) {
                Ok(s) => (
                    s,
                    if want_cuda {
                        "CUDAExecutionProvider"
                    } else {
                        "CPUExecutionProvider"
                    },
                ),
                Err(err) if want_cuda && opts.device == Device::Auto => {
                    tracing::warn!("--device auto: CUDA failed ({err:#}); running on the CPU");
                    (builder(false)?, "CPUExecutionProvider")
                }
                Err(err) if want_cuda => {
                    return Err(err.context(
                        "--device cuda: ONNX Runtime could not start the CUDA execution provider \
                         (is there a GPU, with its driver?)",
                    ))
                }
                Err(err) => {
                    return Err(err.context(format!("ONNX Runtime cannot load {}", path.display())))
                }
            };
            let output_names: Vec<String> = session
                .outputs()
                .iter()
                .map(|o| o.name().to_string())
                .collect();
            Ok(Self {
                roles: output_roles(&output_names),
                output_names,
                input_name: meta.input_name.clone(),
                session,
                size: meta.preprocess.input_size,
                provider,
                threads,
                lib: lib.clone(),
            })
        }
    }

    impl Backend for OrtBackend {
        fn describe(&self) -> String {
            format!(
                "onnxruntime ({}, {} threads, {})",
                self.provider,
                self.threads,
                self.lib.display()
            )
        }

        fn run(&mut self, pixels: &[f32], batch: usize) -> anyhow::Result<RawOutputs> {
            let s = self.size;
            let input = Tensor::from_array(([batch, 3, s, s], pixels.to_vec()))
                .map_err(|e| anyhow!("ONNX Runtime: bad input tensor: {e}"))?;
            let outputs = self
                .session
                .run(ort::inputs![self.input_name.as_str() => input])
                .map_err(|e| anyhow!("ONNX Runtime: inference failed: {e}"))?;
            let take = |i: Option<usize>| -> anyhow::Result<Option<(Vec<f32>, usize)>> {
                let Some(i) = i else { return Ok(None) };
                let name = &self.output_names[i];
                let v = outputs
                    .get(name.as_str())
                    .ok_or_else(|| anyhow!("ONNX Runtime: no output '{name}'"))?;
                let (shape, data) = v
                    .try_extract_tensor::<f32>()
                    .map_err(|e| anyhow!("ONNX Runtime: output '{name}': {e}"))?;
                let classes = shape.last().copied().unwrap_or(1).max(0) as usize;
                Ok(Some((data.to_vec(), classes)))
            };
            Ok(RawOutputs::new(take(self.roles.0)?, take(self.roles.1)?))
        }
    }
}
