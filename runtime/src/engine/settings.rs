//! How a model is to be run, in one place: the command line's model flags ([`ModelArgs`]) and
//! the environment's tract settings (`MAE_TRACT_PLANS`, `MAE_TRACT_WAIT`, `MAE_TRACT_REWRITES`,
//! `MAE_KERNELS`) become one [`LoadOptions`].

use std::path::PathBuf;

use crate::accel::Rewrites;
use crate::engine::model::MetaOverrides;
use crate::kernels::select::Path;

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

/// `--parallel` values: how tract uses its threads on a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Parallel {
    Auto,
    Images,
    Ops,
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
}

/// One environment variable's closed set of values: `(value, what it means, setting)`, the
/// first being the default (also for an unset or empty variable).
struct Choice<T: Copy + 'static> {
    env: &'static str,
    values: &'static [(&'static str, &'static str, T)],
}

impl<T: Copy> Choice<T> {
    /// The setting `value` (the variable's value, if set) names, or an error listing them all.
    fn parse(&self, value: Option<&str>) -> anyhow::Result<T> {
        let v = value.map(str::trim).unwrap_or("");
        if v.is_empty() {
            return Ok(self.values[0].2);
        }
        match self.values.iter().find(|(name, _, _)| *name == v) {
            Some((_, _, t)) => Ok(*t),
            None => {
                let expected: Vec<String> = self
                    .values
                    .iter()
                    .map(|(name, what, _)| format!("'{name}' ({what})"))
                    .collect();
                let (last, rest) = expected.split_last().expect("a choice has values");
                let list = match rest {
                    [] => last.clone(),
                    _ => format!("{} or {last}", rest.join(", ")),
                };
                anyhow::bail!("{}={v:?}: expected {list}", self.env)
            }
        }
    }

    /// The setting of the environment.
    fn read(&self) -> anyhow::Result<T> {
        self.parse(std::env::var(self.env).ok().as_deref())
    }
}

const PLANS: Choice<TractPlans> = Choice {
    env: TractPlans::ENV,
    values: &[
        (
            "image",
            "a plan for one image, batches run image by image",
            TractPlans::Image,
        ),
        (
            "symbolic",
            "one plan for any batch size",
            TractPlans::Symbolic,
        ),
    ],
};

const WAIT: Choice<TractWait> = Choice {
    env: TractWait::ENV,
    values: &[
        (
            "spin",
            "threads stay awake between a pass's products",
            TractWait::Spin,
        ),
        ("sleep", "idle threads sleep", TractWait::Sleep),
    ],
};

const REWRITES: Choice<Rewrites> = Choice {
    env: Rewrites::ENV,
    values: &[
        ("all", "rewrite the forms tract runs slowly", Rewrites::All),
        (
            "no-products",
            "all but the linear layers' products",
            Rewrites::NoProducts,
        ),
        ("none", "tract's own plan", Rewrites::None),
    ],
};

const KERNELS: Choice<Path> = Choice {
    env: Path::ENV,
    values: &[
        ("auto", "the best path this CPU runs", Path::Auto),
        (
            "avx512",
            "AVX-512F, and AVX-512 VNNI for int8",
            Path::Avx512,
        ),
        (
            "avx-vnni",
            "AVX2 and FMA, and the 256-bit AVX-VNNI for int8",
            Path::AvxVnni,
        ),
        ("avx2", "AVX2 and FMA", Path::Avx2),
        ("portable", "plain Rust, on any CPU", Path::Portable),
    ],
};

/// The tract backend's settings, from the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TractSettings {
    pub plans: TractPlans,
    pub wait: TractWait,
    pub rewrites: Rewrites,
    /// The kernel path asked for (checked against the CPU when a model loads).
    pub kernels: Path,
}

impl Default for TractSettings {
    /// What an empty environment gives.
    fn default() -> Self {
        Self {
            plans: TractPlans::Image,
            wait: TractWait::Spin,
            rewrites: Rewrites::All,
            kernels: Path::Auto,
        }
    }
}

impl TractSettings {
    /// From `MAE_TRACT_PLANS`, `MAE_TRACT_WAIT`, `MAE_TRACT_REWRITES` and `MAE_KERNELS`.
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Self {
            plans: PLANS.read()?,
            wait: WAIT.read()?,
            rewrites: REWRITES.read()?,
            kernels: KERNELS.read()?,
        })
    }

    /// `MAE_KERNELS`, alone (for `mae-run info`).
    pub fn kernels_from_env() -> anyhow::Result<Path> {
        KERNELS.read()
    }
}

/// Everything a backend needs to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub kind: BackendKind,
    pub device: Device,
    pub threads: usize,
    /// How tract spreads a batch over its threads.
    pub parallel: Parallel,
    pub ort_lib: Option<PathBuf>,
    pub tract: TractSettings,
}

/// Options shared by every command that runs a model.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// The ONNX model.
    #[arg(long, short = 'm', value_name = "FILE")]
    pub model: PathBuf,
    /// Inference engine.
    #[arg(long, value_enum, default_value_t = BackendKind::Tract)]
    pub backend: BackendKind,
    /// Where to run: cpu, cuda (ONNX Runtime's CUDA provider; an error without it) or auto
    /// (CUDA when available, else CPU with a warning).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Threads for inference (default: every core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// How tract spreads a batch over its threads: `images` gives each thread a share of the
    /// batch's images (a single-threaded plan each: throughput), `ops` splits every matrix
    /// product across the threads (latency), `auto` takes images for batches of two or more
    /// and ops for one image (and for a batch's images past its last whole round over the
    /// threads). ONNX Runtime uses its own intra-op threads.
    #[arg(long, value_enum, default_value_t = Parallel::Auto)]
    pub parallel: Parallel,
    /// libonnxruntime.so to load (default: ORT_DYLIB_PATH, beside the executable, the project
    /// virtualenv, the system library folders).
    #[arg(long, value_name = "FILE")]
    pub ort_lib: Option<PathBuf>,
    /// Refuse the model unless its SHA-256 is this (hex).
    #[arg(long, value_name = "HEX")]
    pub expect_sha256: Option<String>,
    #[command(flatten)]
    pub overrides: MetaOverrides,
}

impl ModelArgs {
    /// The flags and the environment's settings as one set of options.
    pub fn load_options(&self) -> anyhow::Result<LoadOptions> {
        Ok(LoadOptions {
            kind: self.backend,
            device: self.device,
            threads: threads(self.threads),
            parallel: self.parallel,
            ort_lib: self.ort_lib.clone(),
            tract: TractSettings::from_env()?,
        })
    }
}

/// Number of threads to use: `requested`, else every core.
pub fn threads(requested: Option<usize>) -> usize {
    requested
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn environment_choices() {
        assert_eq!(PLANS.parse(None).unwrap(), TractPlans::Image);
        assert_eq!(PLANS.parse(Some("")).unwrap(), TractPlans::Image);
        assert_eq!(PLANS.parse(Some("image")).unwrap(), TractPlans::Image);
        assert_eq!(
            PLANS.parse(Some(" symbolic ")).unwrap(),
            TractPlans::Symbolic
        );
        let err = PLANS.parse(Some("batch")).unwrap_err().to_string();
        assert!(
            err.contains(TractPlans::ENV) && err.contains("symbolic"),
            "{err}"
        );
        assert_eq!(WAIT.parse(None).unwrap(), TractWait::Spin);
        assert_eq!(WAIT.parse(Some(" spin")).unwrap(), TractWait::Spin);
        assert_eq!(WAIT.parse(Some("sleep")).unwrap(), TractWait::Sleep);
        let err = WAIT.parse(Some("busy")).unwrap_err().to_string();
        assert!(
            err.contains(TractWait::ENV) && err.contains("sleep"),
            "{err}"
        );
        assert_eq!(REWRITES.parse(None).unwrap(), Rewrites::All);
        assert_eq!(REWRITES.parse(Some(" all")).unwrap(), Rewrites::All);
        assert_eq!(REWRITES.parse(Some("none")).unwrap(), Rewrites::None);
        assert_eq!(
            REWRITES.parse(Some("no-products")).unwrap(),
            Rewrites::NoProducts
        );
        let err = REWRITES.parse(Some("some")).unwrap_err().to_string();
        assert!(err.contains(Rewrites::ENV) && err.contains("none"), "{err}");
        let defaults = TractSettings {
            plans: PLANS.parse(None).unwrap(),
            wait: WAIT.parse(None).unwrap(),
            rewrites: REWRITES.parse(None).unwrap(),
            kernels: KERNELS.parse(None).unwrap(),
        };
        assert_eq!(defaults, TractSettings::default());
        assert_eq!(KERNELS.parse(Some("avx-vnni")).unwrap(), Path::AvxVnni);
        let err = KERNELS.parse(Some("sse")).unwrap_err().to_string();
        assert!(err.contains(Path::ENV) && err.contains("avx2"), "{err}");
    }
}
