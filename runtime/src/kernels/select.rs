//! Which kernels run: one path per x86 level (`MAE_KERNELS=auto|avx512|avx-vnni|avx2|portable`),
//! and what each path gives every kind of operator.
//!
//! | path       | float32 products, attention | int8 products          | LayerNorm, quantizers, GELU |
//! |------------|-----------------------------|------------------------|-----------------------------|
//! | `avx512`   | AVX-512F                    | AVX-512 VNNI (else the best below) | AVX-512F        |
//! | `avx-vnni` | AVX2 + FMA                  | AVX-VNNI (256-bit)     | AVX2                        |
//! | `avx2`     | AVX2 + FMA                  | AVX2 (16-bit pairs)    | AVX2                        |
//! | `portable` | plain Rust                  | plain Rust             | the target's baseline       |
//!
//! `auto` takes the first path of the table this CPU runs. On a CPU without AVX2 and FMA it
//! leaves the products to tract's own kernels (the portable tiles would be slower than them);
//! `portable`, asked for by name, runs them anyway, for checking.

use crate::kernels::f32::F32Tile;
use crate::kernels::i8::I8Tile;
use crate::kernels::vector::Vector;

/// A path, as `MAE_KERNELS` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    Auto,
    Avx512,
    AvxVnni,
    Avx2,
    Portable,
}

impl Path {
    /// The environment variable that chooses (read by `crate::engine::settings`).
    pub const ENV: &'static str = "MAE_KERNELS";

    /// Every named path, best first.
    pub const NAMED: [Path; 4] = [Path::Avx512, Path::AvxVnni, Path::Avx2, Path::Portable];

    pub fn name(self) -> &'static str {
        match self {
            Path::Auto => "auto",
            Path::Avx512 => "avx512",
            Path::AvxVnni => "avx-vnni",
            Path::Avx2 => "avx2",
            Path::Portable => "portable",
        }
    }

    /// The CPU features the path needs, as `is_x86_feature_detected!` names them.
    fn required(self) -> &'static [&'static str] {
        match self {
            Path::Auto | Path::Portable => &[],
            Path::Avx512 => &["avx512f"],
            Path::AvxVnni => &["avx2", "fma", "avxvnni"],
            Path::Avx2 => &["avx2", "fma"],
        }
    }

    /// What the CPU needs for this path, in words.
    pub fn needs(self) -> String {
        match self.required() {
            [] => "nothing".into(),
            [one] => (*one).into(),
            [first @ .., last] => format!("{} and {last}", first.join(", ")),
        }
    }

    /// Why a CPU that has the features `has` says it has (all of them: `features`) cannot run
    /// this path; `None` where it can.
    pub fn refusal(self, has: &dyn Fn(&str) -> bool, features: &[&str]) -> Option<String> {
        if self.required().iter().all(|f| has(f)) {
            return None;
        }
        let runs: Vec<&str> = Path::NAMED
            .iter()
            .filter(|p| p.required().iter().all(|f| has(f)))
            .map(|p| p.name())
            .collect();
        Some(format!(
            "{}={}: this CPU lacks {} (it has: {}); paths it runs: {}",
            Path::ENV,
            self.name(),
            self.needs(),
            if features.is_empty() {
                "no vector extensions mae-run knows".into()
            } else {
                features.join(" ")
            },
            runs.join(", ")
        ))
    }

    /// Whether this CPU runs the path.
    pub fn available(self) -> bool {
        self.kernels().is_some()
    }

    /// The path's kernels on this CPU; `None` where it lacks the instructions (for `Auto`:
    /// where the products stay with tract's own kernels).
    fn kernels(self) -> Option<Kernels> {
        let portable = Kernels {
            path: Path::Portable,
            f32: F32Tile::Portable,
            i8: I8Tile::Portable,
            vector: Vector::Portable,
        };
        #[cfg(target_arch = "x86_64")]
        {
            use crate::kernels::x86_64::vnni::Vnni;
            use crate::kernels::x86_64::{avx2::Avx2, avx512::Avx512, avx_vnni::AvxVnni};
            let avx2 = Avx2::detect();
            let vnni256 = AvxVnni::detect().filter(|_| avx2.is_some());
            match self {
                Path::Auto => Path::NAMED[..3].iter().find_map(|p| p.kernels()),
                Path::Avx512 => {
                    let cpu = Avx512::detect()?;
                    let i8 = Vnni::detect().map(I8Tile::Vnni).or_else(|| {
                        vnni256
                            .map(I8Tile::AvxVnni)
                            .or_else(|| avx2.map(I8Tile::Avx2))
                    });
                    Some(Kernels {
                        path: self,
                        f32: F32Tile::Avx512(cpu),
                        i8: i8.unwrap_or(I8Tile::Portable),
                        vector: Vector::Avx512(cpu),
                    })
                }
                Path::AvxVnni => {
                    let (cpu, vnni) = (avx2?, vnni256?);
                    Some(Kernels {
                        path: self,
                        f32: F32Tile::Avx2(cpu),
                        i8: I8Tile::AvxVnni(vnni),
                        vector: Vector::Avx2(cpu),
                    })
                }
                Path::Avx2 => {
                    let cpu = avx2?;
                    Some(Kernels {
                        path: self,
                        f32: F32Tile::Avx2(cpu),
                        i8: I8Tile::Avx2(cpu),
                        vector: Vector::Avx2(cpu),
                    })
                }
                Path::Portable => Some(portable),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        match self {
            Path::Portable => Some(portable),
            _ => None,
        }
    }
}

impl std::str::FromStr for Path {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let all = [
            Path::Auto,
            Path::Avx512,
            Path::AvxVnni,
            Path::Avx2,
            Path::Portable,
        ];
        all.into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let names: Vec<&str> = all.iter().map(|p| p.name()).collect();
                format!("{}={s:?}: expected one of {}", Path::ENV, names.join(", "))
            })
    }
}

/// The kernels of one path on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kernels {
    /// The path they come from (`auto` resolved).
    pub path: Path,
    pub f32: F32Tile,
    pub i8: I8Tile,
    pub vector: Vector,
}

/// What runs a model's operators: mae-run's kernels of one path, or, for the products, tract's
/// own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Choice {
    /// What was asked for.
    pub asked: Path,
    /// The products' kernels: `None` leaves them to tract.
    pub products: Option<Kernels>,
    /// LayerNorm, the quantizers and GELU's scaling.
    pub vector: Vector,
}

impl Choice {
    /// The kernels of `asked` on this CPU; an error naming what the CPU lacks where it cannot
    /// run the path.
    pub fn new(asked: Path) -> anyhow::Result<Self> {
        let features = cpu_features();
        if let Some(why) = asked.refusal(&|f| features.contains(&f), &features) {
            anyhow::bail!(why);
        }
        match asked.kernels() {
            Some(k) => Ok(Self {
                asked,
                products: Some(k),
                vector: k.vector,
            }),
            None if asked == Path::Auto => Ok(Self {
                asked,
                products: None,
                vector: Vector::Portable,
            }),
            None => anyhow::bail!(
                "{}={}: this CPU cannot run it (it has: {})",
                Path::ENV,
                asked.name(),
                features.join(" ")
            ),
        }
    }

    /// The path of each kind of operator, in words.
    pub fn describe(&self) -> String {
        let how = match self.asked {
            Path::Auto => format!("{}=auto", Path::ENV),
            p => format!("{}={} (forced)", Path::ENV, p.name()),
        };
        match &self.products {
            Some(k) => format!(
                "{how}: float32 products and attention {}, int8 products {}, LayerNorm and \
                 quantizers {}",
                k.f32.name(),
                k.i8.name(),
                k.vector.name()
            ),
            None => format!(
                "{how}: products on tract's own kernels (this CPU lacks AVX2 and FMA), LayerNorm \
                 and quantizers {}",
                self.vector.name()
            ),
        }
    }

    /// The paths, as fields (for JSON).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "asked": self.asked.name(),
            "f32_products": self.products.map_or("tract", |k| k.f32.name()),
            "attention": self.products.map_or("tract", |k| k.f32.name()),
            "int8_products": self.products.map_or("tract", |k| k.i8.name()),
            "layer_norm_and_quantizers": self.vector.name(),
        })
    }
}

/// The vector instruction sets of this CPU that mae-run's kernels know of.
pub fn cpu_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! features {
            ($($f:tt),*) => {{
                let mut v = Vec::new();
                $(if std::arch::is_x86_feature_detected!($f) { v.push($f); })*
                v
            }};
        }
        features!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avxvnni",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16",
            "avx512fp16"
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// The CPU's model name, from `/proc/cpuinfo` (where there is one).
pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// One line on the CPU: its model and vector features.
pub fn describe_cpu() -> String {
    format!(
        "{} ({} cores; {})",
        cpu_model().unwrap_or_else(|| std::env::consts::ARCH.into()),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_features().join(" ")
    )
}
