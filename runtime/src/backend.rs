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

/// An engine with a loaded model. `run` is used from one thread at a time; a backend with
/// lanes also runs from several threads at once through `run_shared`.
pub trait Backend: Send + Sync {
    /// `tract 0.23 (2 threads)`, `onnxruntime (CPUExecutionProvider, 2 threads)`.
    fn describe(&self) -> String;
    /// Runs `pixels` (`[batch, 3, s, s]`, normalised) through the graph.
    fn run(&mut self, pixels: &[f32], batch: usize) -> anyhow::Result<RawOutputs>;
    /// How many threads may each run images through `run_shared` on their own core at once
    /// (0: the backend runs one batch at a time, through `run`).
    fn lanes(&self) -> usize {
        0
    }
    /// Runs `pixels` as `run` does (`alone == false`), or on the calling thread alone, beside
    /// other such calls (`alone`); only for a backend with lanes.
    fn run_shared(
        &self,
        _pixels: &[f32],
        _batch: usize,
        _alone: bool,
    ) -> anyhow::Result<RawOutputs> {
        bail!("this backend runs one batch at a time")
    }
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

/// How the tract backend plans (optimises) the graph for the batches it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TractPlans {
    /// One plan optimised for a single image, and a batch run image by image (the default).
    /// tract optimises a concrete shape further than a symbolic batch (it drops layout operators
    /// that a symbolic batch keeps: ViT-B, one image, 2 threads, an AMD EPYC: 161 ms against
    /// 285 ms), a batch gains it little per image, and one plan holds one copy of the weights.
    Image,
    /// One plan with a symbolic batch dimension, run on whole batches.
    Symbolic,
}

impl TractPlans {
    /// The environment variable that chooses: `image` (the default) or `symbolic`.
    pub const ENV: &'static str = "MAE_TRACT_PLANS";

    /// From [`Self::ENV`]; unset or empty is [`Self::Image`].
    pub fn from_env() -> anyhow::Result<Self> {
        Self::parse(std::env::var(Self::ENV).ok().as_deref())
    }

    fn parse(value: Option<&str>) -> anyhow::Result<Self> {
        match value.map(str::trim).unwrap_or("") {
            "" | "image" => Ok(Self::Image),
            "symbolic" => Ok(Self::Symbolic),
            other => bail!(
                "{}={other:?}: expected 'image' (a plan for one image, batches run image by \
                 image) or 'symbolic' (one plan for any batch size)",
                Self::ENV
            ),
        }
    }
}

/// How the threads tract splits a pass's products over wait between products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TractWait {
    /// While a pass runs over every thread, the threads other than the plan's look for work
    /// without sleeping (the default), as ONNX Runtime's do: the operators tract does not split
    /// (LayerNorm, residual sums, layout) leave gaps between products, long enough for an idle
    /// thread to fall asleep and to cost a wake-up at the next product.
    Spin,
    /// Idle threads sleep as the thread pool decides (they spin only briefly).
    Sleep,
}

impl TractWait {
    /// The environment variable that chooses: `spin` (the default) or `sleep`.
    pub const ENV: &'static str = "MAE_TRACT_WAIT";

    /// From [`Self::ENV`]; unset or empty is [`Self::Spin`].
    pub fn from_env() -> anyhow::Result<Self> {
        Self::parse(std::env::var(Self::ENV).ok().as_deref())
    }

    fn parse(value: Option<&str>) -> anyhow::Result<Self> {
        match value.map(str::trim).unwrap_or("") {
            "" | "spin" => Ok(Self::Spin),
            "sleep" => Ok(Self::Sleep),
            other => bail!(
                "{}={other:?}: expected 'spin' (threads stay awake between a pass's products) \
                 or 'sleep' (idle threads sleep)",
                Self::ENV
            ),
        }
    }
}

/// Runs `f` on this thread of `pool` while `helpers` other threads of the pool look for its
/// work without sleeping, until `f` returns (or unwinds).
///
/// A helper is a job of a scope: it returns at once on the thread that runs `f`, and when it
/// finds no work for [`AWAKE_IDLE`] in a row, so that a helper a thread took up while it
/// waited for a part of `f`'s work (rayon's threads run other jobs while they wait) lets that
/// thread go on; it can delay `f` by that much, never stop it.
pub(crate) fn with_threads_awake<R: Send>(
    pool: &rayon::ThreadPool,
    helpers: usize,
    f: impl FnOnce() -> R + Send,
) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    struct Done<'a>(&'a AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    pool.install(|| {
        let done = AtomicBool::new(false);
        let owner = rayon::current_thread_index();
        rayon::scope(|s| {
            for _ in 0..helpers {
                let done = &done;
                s.spawn(move |_| {
                    if rayon::current_thread_index() == owner {
                        return;
                    }
                    let mut idle_since: Option<std::time::Instant> = None;
                    while !done.load(Ordering::Acquire) {
                        match rayon::yield_now() {
                            Some(rayon::Yield::Executed) => idle_since = None,
                            Some(rayon::Yield::Idle) => {
                                let since = *idle_since.get_or_insert_with(std::time::Instant::now);
                                if since.elapsed() > AWAKE_IDLE {
                                    return;
                                }
                                std::hint::spin_loop();
                            }
                            None => return,
                        }
                    }
                });
            }
            let _done = Done(&done);
            f()
        })
    })
}

/// How long a thread kept awake by [`with_threads_awake`] looks for work in vain before it
/// gives up: longer than the gaps between a ViT pass's products (LayerNorm, a residual sum:
/// tenths of a millisecond), short beside a pass.
pub(crate) const AWAKE_IDLE: std::time::Duration = std::time::Duration::from_millis(2);

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
            let rewrites = crate::tract_rewrite::Rewrites::from_env()?;
            if meta.precision.as_deref() == Some("int8")
                && rewrites == crate::tract_rewrite::Rewrites::None
            {
                tracing::warn!(
                    "{}: int8 models run several times slower in tract's own graph ({}=none) \
                     than their float32 export",
                    path.display(),
                    crate::tract_rewrite::Rewrites::ENV
                );
            }
            Ok(Box::new(tract_backend::TractBackend::load(
                path,
                meta,
                opts.threads,
                opts.parallel,
                TractPlans::from_env()?,
                rewrites,
                TractWait::from_env()?,
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

    type Plan = Arc<TypedRunnableModel>;

    pub(super) enum Plans {
        /// Optimised for one image; a batch runs image by image.
        Image(Plan),
        /// Run on whole batches: the file fixes the batch (`Some(b)`), or the batch is
        /// symbolic.
        Whole(Plan, Option<usize>),
    }

    pub struct TractBackend {
        pub(super) plans: Plans,
        pub(super) rewritten: crate::tract_rewrite::Rewritten,
        rewrites: crate::tract_rewrite::Rewrites,
        /// The threads tract splits operators over (more than one thread asked for).
        pool: Option<Arc<rayon::ThreadPool>>,
        size: usize,
        roles: (Option<usize>, Option<usize>),
        threads: usize,
        parallel: crate::Parallel,
        wait: TractWait,
    }

    /// Joins the outputs of consecutive parts of a batch along the batch axis.
    fn join(parts: Vec<TVec<TValue>>) -> anyhow::Result<TVec<TValue>> {
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().unwrap_or_default());
        }
        let outputs = parts.first().map_or(0, |p| p.len());
        let mut joined = TVec::new();
        for o in 0..outputs {
            let pieces: Vec<Tensor> = parts.iter().map(|p| p[o].clone().into_tensor()).collect();
            let t = Tensor::stack_tensors(0, &pieces).context("tract: joining the outputs")?;
            joined.push(t.into_tvalue());
        }
        Ok(joined)
    }

    impl TractBackend {
        pub fn load(
            path: &Path,
            meta: &ModelMeta,
            threads: usize,
            parallel: crate::Parallel,
            mode: TractPlans,
            rewrites: crate::tract_rewrite::Rewrites,
            wait: TractWait,
        ) -> anyhow::Result<Self> {
            // tract's matrix products are single-threaded unless given a pool. Each run names
            // its executor (see `run`): the plan runs on one of the pool's threads, so that the
            // pool's threads are all the threads there are.
            let pool = if threads > 1 {
                let pool = rayon::ThreadPoolBuilder::new()
                    .thread_name(|i| format!("tract-{i}"))
                    .num_threads(threads)
                    .build()
                    .context("tract: starting its threads")?;
                Some(Arc::new(pool))
            } else {
                None
            };
            let s = meta.preprocess.input_size;
            let load = || -> TractResult<(Plans, crate::tract_rewrite::Rewritten)> {
                let (mut model, integer) = crate::tract_rewrite::parse(path, rewrites)?;
                // The image size is concrete, whatever the file declares; the batch is the
                // file's fixed batch, one image, or symbolic.
                let per_image = meta.fixed_batch.is_none() && mode == TractPlans::Image;
                let batch: TDim = match meta.fixed_batch {
                    Some(b) => (b as i64).into(),
                    None if per_image => 1.into(),
                    None => model.sym("batch").into(),
                };
                let shape: TVec<TDim> =
                    tvec![batch, 3.into(), (s as i64).into(), (s as i64).into()];
                model.set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))?;
                let (model, mut done) =
                    crate::tract_rewrite::optimize(model.into_typed()?, rewrites)?;
                done.integer_products = integer;
                tracing::debug!("tract rewrites: {done:?}");
                let plan = model.into_runnable()?;
                let plans = if per_image {
                    Plans::Image(plan)
                } else {
                    Plans::Whole(plan, meta.fixed_batch)
                };
                Ok((plans, done))
            };
            let (plans, rewritten) =
                load().with_context(|| format!("tract cannot load {}", path.display()))?;
            Ok(Self {
                plans,
                rewritten,
                rewrites,
                pool,
                size: s,
                roles: output_roles(&meta.output_names),
                threads,
                parallel,
                wait,
            })
        }

        /// Runs `batch` images on this thread (the matrix products spread over the default
        /// executor's threads, if any): whole, or image by image with the one-image plan.
        fn run_plan(&self, pixels: &[f32], batch: usize) -> anyhow::Result<TVec<TValue>> {
            let s = self.size;
            let run = |plan: &Plan, px: &[f32], n: usize| -> anyhow::Result<TVec<TValue>> {
                let input =
                    Tensor::from_shape(&[n, 3, s, s], px).context("tract: bad input tensor")?;
                plan.run(tvec!(input.into()))
                    .context("tract: inference failed")
            };
            match &self.plans {
                Plans::Whole(plan, _) => run(plan, pixels, batch),
                Plans::Image(plan) => {
                    let per_image = 3 * s * s;
                    let parts = pixels
                        .chunks(per_image)
                        .take(batch)
                        .map(|px| run(plan, px, 1))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    join(parts)
                }
            }
        }

        /// Runs the batch on this backend's pool, its products split over the pool's threads
        /// (or on this thread alone, with one thread).
        fn run_on_pool(&self, pixels: &[f32], batch: usize) -> anyhow::Result<TVec<TValue>> {
            use tract_linalg::multithread::{multithread_tract_scope, Executor};
            if let Some(pool) = &self.pool {
                // On a pool thread, the plan's own thread is one of the pool's: while it runs
                // the operators tract does not split, no other thread competes for its core.
                let executor = Executor::MultiThread(pool.clone());
                let run = || multithread_tract_scope(executor, || self.run_plan(pixels, batch));
                match self.wait {
                    TractWait::Spin => with_threads_awake(pool, self.threads - 1, run),
                    TractWait::Sleep => pool.install(run),
                }
            } else {
                // One thread: not another backend's pool either.
                multithread_tract_scope(Executor::SingleThread, || self.run_plan(pixels, batch))
            }
        }

        /// Runs the batch as `shares` parts at once, each on its own thread with a
        /// single-threaded executor, and joins their outputs in order.
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
            join(parts.into_iter().collect::<anyhow::Result<Vec<_>>>()?)
        }
    }

    impl Backend for TractBackend {
        fn describe(&self) -> String {
            format!(
                "tract 0.23 (CPU, {} threads, parallel over {}, {}, {})",
                self.threads.max(1),
                match self.parallel {
                    crate::Parallel::Images => "images",
                    crate::Parallel::Ops => "operators",
                    crate::Parallel::Auto => {
                        "images in batches, operators for one image (and a batch's last odd ones)"
                    }
                },
                match &self.plans {
                    Plans::Image(_) => "a plan for one image, batches run image by image".into(),
                    Plans::Whole(_, Some(b)) =>
                        format!("one plan: the model fixes the batch at {b}"),
                    Plans::Whole(_, None) => format!(
                        "one plan with a symbolic batch ({}=symbolic)",
                        TractPlans::ENV
                    ),
                },
                self.rewritten.describe(self.rewrites)
            ) + match (self.threads > 1, self.wait) {
                (false, _) => "",
                (true, TractWait::Spin) => {
                    " [threads stay awake during a pass; MAE_TRACT_WAIT=sleep lets them sleep]"
                }
                (true, TractWait::Sleep) => " [idle threads sleep: MAE_TRACT_WAIT=sleep]",
            }
        }

        fn run(&mut self, pixels: &[f32], batch: usize) -> anyhow::Result<RawOutputs> {
            self.run_shared(pixels, batch, false)
        }

        fn lanes(&self) -> usize {
            let fixed = matches!(self.plans, Plans::Whole(_, Some(_)));
            if self.threads >= 2 && self.parallel != crate::Parallel::Ops && !fixed {
                self.threads
            } else {
                0
            }
        }

        fn run_shared(
            &self,
            pixels: &[f32],
            batch: usize,
            alone: bool,
        ) -> anyhow::Result<RawOutputs> {
            use tract_linalg::multithread::{multithread_tract_scope, Executor};
            if alone {
                let outputs = multithread_tract_scope(Executor::SingleThread, || {
                    self.run_plan(pixels, batch)
                })?;
                return self.raw_outputs(&outputs);
            }
            let by_images = match self.parallel {
                crate::Parallel::Images => true,
                crate::Parallel::Ops => false,
                crate::Parallel::Auto => batch >= 2,
            };
            // A graph with a fixed batch runs whole batches only.
            let fixed = matches!(self.plans, Plans::Whole(_, Some(_)));
            let shares = self.threads.min(batch);
            // With the one-image plan and `auto`, the images past the last whole round over
            // the threads (3 of 8 on 2 threads: the 3rd) run with the products split over the
            // threads, instead of one thread running them while the others wait.
            let rest = match (&self.plans, self.parallel) {
                (Plans::Image(_), crate::Parallel::Auto) if shares >= 2 => batch % self.threads,
                _ => 0,
            };
            let outputs = if by_images && shares >= 2 && !fixed && rest > 0 && batch > rest {
                let whole = batch - rest;
                let per_image = 3 * self.size * self.size;
                let (first, last) = pixels.split_at(whole * per_image);
                let a = self.run_images(first, whole, self.threads)?;
                let b = self.run_on_pool(last, rest)?;
                join(vec![a, b])?
            } else if by_images && shares >= 2 && !fixed {
                self.run_images(pixels, batch, shares)?
            } else {
                self.run_on_pool(pixels, batch)?
            };
            self.raw_outputs(&outputs)
        }
    }

    impl TractBackend {
        /// The logits and probabilities among a plan's outputs.
        fn raw_outputs(&self, outputs: &TVec<TValue>) -> anyhow::Result<RawOutputs> {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::tract_backend::{Plans, TractBackend};
    use super::*;
    use crate::model::{MetaOverrides, ModelFile};
    use crate::testgraph::{floats, init, int, ints, model_bytes, node, value};
    use crate::tract_rewrite::Rewrites;
    use crate::Parallel;
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

    #[test]
    fn plan_mode_values() {
        assert_eq!(TractPlans::parse(None).unwrap(), TractPlans::Image);
        assert_eq!(TractPlans::parse(Some("")).unwrap(), TractPlans::Image);
        assert_eq!(TractPlans::parse(Some("image")).unwrap(), TractPlans::Image);
        assert_eq!(
            TractPlans::parse(Some(" symbolic ")).unwrap(),
            TractPlans::Symbolic
        );
        let err = TractPlans::parse(Some("batch")).unwrap_err().to_string();
        assert!(
            err.contains(TractPlans::ENV) && err.contains("symbolic"),
            "{err}"
        );
    }

    #[test]
    fn wait_mode_values() {
        assert_eq!(TractWait::parse(None).unwrap(), TractWait::Spin);
        assert_eq!(TractWait::parse(Some(" spin")).unwrap(), TractWait::Spin);
        assert_eq!(TractWait::parse(Some("sleep")).unwrap(), TractWait::Sleep);
        let err = TractWait::parse(Some("busy")).unwrap_err().to_string();
        assert!(
            err.contains(TractWait::ENV) && err.contains("sleep"),
            "{err}"
        );
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
                TractPlans::Image,
                Rewrites::All,
                TractWait::Spin,
            )
            .unwrap();
            // The two wait modes too: the threads' waiting changes no number.
            let mut sym = TractBackend::load(
                &path,
                &meta,
                threads,
                parallel,
                TractPlans::Symbolic,
                Rewrites::All,
                TractWait::Sleep,
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
            TractPlans::Image,
            Rewrites::All,
            TractWait::Spin,
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
            TractPlans::Symbolic,
            Rewrites::All,
            TractWait::Spin,
        )
        .unwrap();
        // A file with a fixed batch of 2: one plan, and the batch is not split over the threads.
        let (fixed_path, fixed_meta) = write_model(dir.path(), Some(2));
        let mut fixed = TractBackend::load(
            &fixed_path,
            &fixed_meta,
            2,
            Parallel::Images,
            TractPlans::Image,
            Rewrites::All,
            TractWait::Spin,
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
}
