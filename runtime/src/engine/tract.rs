//! The tract backend: pure Rust, on the CPU. Plans come from `crate::accel` (the graph with
//! mae-run's rewrites), for one image or a symbolic batch; a batch runs over the threads by
//! images or by operators (`--parallel`).

use std::path::Path;

use anyhow::{anyhow, Context};
use tract_onnx::prelude::*;

use crate::accel::{Rewrites, Rewritten};
use crate::engine::backend::{output_roles, Backend, OutputTensor, RawOutputs};
use crate::engine::model::ModelMeta;
use crate::engine::settings::{Parallel, TractPlans, TractSettings, TractWait};
use crate::kernels::select::Choice;

type Plan = Arc<TypedRunnableModel>;

pub(crate) enum Plans {
    /// Optimised for one image; a batch runs image by image.
    Image(Plan),
    /// Run on whole batches: the file fixes the batch (`Some(b)`), or the batch is
    /// symbolic.
    Whole(Plan, Option<usize>),
}

pub(crate) struct TractBackend {
    pub(crate) plans: Plans,
    pub(crate) rewritten: Rewritten,
    rewrites: Rewrites,
    kernels: Choice,
    /// The threads tract splits operators over (more than one thread asked for).
    pool: Option<Arc<rayon::ThreadPool>>,
    size: usize,
    roles: (Option<usize>, Option<usize>),
    /// The graph's output names, in order.
    names: Vec<String>,
    threads: usize,
    parallel: Parallel,
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
        parallel: Parallel,
        settings: TractSettings,
    ) -> anyhow::Result<Self> {
        let TractSettings {
            plans: mode,
            wait,
            rewrites,
            kernels,
        } = settings;
        let kernels = Choice::new(kernels)?;
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
        let load = || -> TractResult<(Plans, Rewritten)> {
            let (mut model, integer) = crate::accel::parse(path, rewrites)?;
            // The image size is concrete, whatever the file declares; the batch is the
            // file's fixed batch, one image, or symbolic.
            let per_image = meta.fixed_batch.is_none() && mode == TractPlans::Image;
            let batch: TDim = match meta.fixed_batch {
                Some(b) => (b as i64).into(),
                None if per_image => 1.into(),
                None => model.sym("batch").into(),
            };
            let shape: TVec<TDim> = tvec![batch, 3.into(), (s as i64).into(), (s as i64).into()];
            model.set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))?;
            let (model, mut done) = crate::accel::optimize(model.into_typed()?, rewrites, kernels)?;
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
            kernels,
            pool,
            size: s,
            roles: output_roles(&meta.output_names),
            names: meta.output_names.clone(),
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
            let input = Tensor::from_shape(&[n, 3, s, s], px).context("tract: bad input tensor")?;
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
            "tract 0.23 (CPU, {} threads, parallel over {}, {}, {}{})",
            self.threads.max(1),
            match self.parallel {
                Parallel::Images => "images",
                Parallel::Ops => "operators",
                Parallel::Auto => {
                    "images in batches, operators for one image (and a batch's last odd ones)"
                }
            },
            match &self.plans {
                Plans::Image(_) => "a plan for one image, batches run image by image".into(),
                Plans::Whole(_, Some(b)) => format!("one plan: the model fixes the batch at {b}"),
                Plans::Whole(_, None) => format!(
                    "one plan with a symbolic batch ({}=symbolic)",
                    TractPlans::ENV
                ),
            },
            self.rewritten.describe(self.rewrites),
            match self.rewrites {
                Rewrites::None => String::new(),
                _ => format!("; kernels: {}", self.kernels.describe()),
            }
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
        if self.threads >= 2 && self.parallel != Parallel::Ops && !fixed {
            self.threads
        } else {
            0
        }
    }

    fn run_shared(&self, pixels: &[f32], batch: usize, alone: bool) -> anyhow::Result<RawOutputs> {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        if alone {
            let outputs =
                multithread_tract_scope(Executor::SingleThread, || self.run_plan(pixels, batch))?;
            return self.raw_outputs(&outputs);
        }
        let by_images = match self.parallel {
            Parallel::Images => true,
            Parallel::Ops => false,
            Parallel::Auto => batch >= 2,
        };
        // A graph with a fixed batch runs whole batches only.
        let fixed = matches!(self.plans, Plans::Whole(_, Some(_)));
        let shares = self.threads.min(batch);
        // With the one-image plan and `auto`, the images past the last whole round over
        // the threads (3 of 8 on 2 threads: the 3rd) run with the products split over the
        // threads, instead of one thread running them while the others wait.
        let rest = match (&self.plans, self.parallel) {
            (Plans::Image(_), Parallel::Auto) if shares >= 2 => batch % self.threads,
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
        let mut raw = RawOutputs::new(take(self.roles.0)?, take(self.roles.1)?);
        for (i, t) in outputs.iter().enumerate() {
            if Some(i) == self.roles.0 || Some(i) == self.roles.1 {
                continue;
            }
            let Ok(t) = t.cast_to::<f32>() else {
                continue;
            };
            raw.maps.push(OutputTensor {
                name: self
                    .names
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("output {i}")),
                shape: t.shape().to_vec(),
                values: t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(),
            });
        }
        Ok(raw)
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
