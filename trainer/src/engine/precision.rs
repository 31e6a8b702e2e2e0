//! Mixed precision: libtorch's autocast (bf16 or fp16, on CUDA or the CPU) around forward
//! passes and losses, and a dynamic loss scaler for fp16, as `torch.autocast` and
//! `torch.cuda.amp.GradScaler` do.

use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::bail;
#[cfg(test)]
use tch::Kind;
use tch::{Device, Tensor};

use crate::cli::Autocast;

/// The precision of this process: 0 fp32, 1 bf16, 2 fp16; bit 4 set when on CUDA.
static MODE: AtomicU8 = AtomicU8::new(0);

#[allow(unsafe_code)]
mod ffi {
    use std::ffi::c_int;

    extern "C" {
        fn mae_autocast_set(device: c_int, dtype: c_int, enabled: c_int) -> c_int;
    }

    /// Switches autocast on or off for `cuda` (else the CPU) with fp16 (else bf16).
    pub fn set(cuda: bool, fp16: bool, enabled: bool) -> bool {
        // SAFETY: plain integers; the shim catches exceptions.
        unsafe { mae_autocast_set(c_int::from(cuda), c_int::from(fp16), c_int::from(enabled)) == 0 }
    }
}

/// Resolves `--precision` for `device` (bf16 on CUDA, fp32 on the CPU by default), makes it the
/// process's mode and returns it.
pub fn configure(arg: Option<Autocast>, device: Device) -> anyhow::Result<Autocast> {
    let p = arg.unwrap_or(if device.is_cuda() {
        Autocast::Bf16
    } else {
        Autocast::Fp32
    });
    if p == Autocast::Bf16 && device.is_cuda() && !tch::utils::has_cuda() {
        bail!("--precision bf16: libtorch has no CUDA");
    }
    let code = match p {
        Autocast::Fp32 => 0,
        Autocast::Bf16 => 1,
        Autocast::Fp16 => 2,
    } | if device.is_cuda() { 16 } else { 0 };
    MODE.store(code, Ordering::Relaxed);
    Ok(p)
}

/// The name of `p` as `--precision` spells it.
pub fn name(p: Autocast) -> &'static str {
    match p {
        Autocast::Fp32 => "fp32",
        Autocast::Bf16 => "bf16",
        Autocast::Fp16 => "fp16",
    }
}

/// The process's precision.
pub fn current() -> Autocast {
    match MODE.load(Ordering::Relaxed) & 15 {
        1 => Autocast::Bf16,
        2 => Autocast::Fp16,
        _ => Autocast::Fp32,
    }
}

/// Runs `f` under autocast when the process's precision is bf16 or fp16.
pub fn autocast<T>(f: impl FnOnce() -> T) -> T {
    let mode = MODE.load(Ordering::Relaxed);
    let (kind, cuda) = (mode & 15, mode & 16 != 0);
    if kind == 0 || !ffi::set(cuda, kind == 2, true) {
        return f();
    }
    let out = f();
    ffi::set(cuda, kind == 2, false);
    out
}

/// The loss scaler a run of precision `p` needs: one for fp16, set up by `--loss-scale` and
/// `--loss-scale-growth-interval`.
pub fn scaler_for(
    p: Autocast,
    args: &crate::cli::PrecisionArgs,
) -> Option<std::cell::RefCell<GradScaler>> {
    (p == Autocast::Fp16).then(|| {
        std::cell::RefCell::new(GradScaler {
            scale: args.loss_scale,
            growth_interval: args.loss_scale_growth_interval.max(1),
            ..GradScaler::default()
        })
    })
}

/// Dynamic loss scaling for fp16 (PyTorch's defaults): the loss is multiplied by `scale`
/// before backward; gradients are divided by it before the step; a step with non-finite
/// gradients is skipped and the scale halved; after `growth_interval` good steps it doubles.
#[derive(Debug, Clone)]
pub struct GradScaler {
    pub scale: f64,
    pub growth_interval: u64,
    good_steps: u64,
    pub skipped: u64,
}

impl Default for GradScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_interval: 2000,
            good_steps: 0,
            skipped: 0,
        }
    }
}

/// Keys of the scaler's state in the optimizer checkpoint; each an int64 (the scale as the bit
/// pattern of its f64, so a resumed run continues with exactly the same scale).
const SCALER_KEYS: [&str; 3] = ["scaler.scale_bits", "scaler.good_steps", "scaler.skipped"];

impl GradScaler {
    /// The state to save beside the optimizer's, under `scaler.*` keys.
    pub fn state(&self) -> Vec<(String, mae_models::TensorData)> {
        let values = [
            self.scale.to_bits() as i64,
            self.good_steps as i64,
            self.skipped as i64,
        ];
        SCALER_KEYS
            .iter()
            .zip(values)
            .map(|(k, v)| {
                let t = mae_models::TensorData::new(
                    mae_models::DType::I64,
                    vec![1],
                    v.to_le_bytes().to_vec(),
                )
                .expect("one int64");
                (k.to_string(), t)
            })
            .collect()
    }

    /// Takes the `scaler.*` entries out of an optimizer state; `None` when it has none (a run
    /// saved without a scaler). The growth interval is not saved: it is a setting, left at its
    /// default here for the caller to set.
    pub fn take_state(sd: &mut mae_models::checkpoint::StateDict) -> Option<Self> {
        let mut v = [0i64; 3];
        for (slot, key) in v.iter_mut().zip(SCALER_KEYS) {
            let t = sd.remove(key)?;
            *slot = i64::from_le_bytes(t.data.get(..8)?.try_into().ok()?);
        }
        Some(Self {
            scale: f64::from_bits(v[0] as u64),
            good_steps: v[1].max(0) as u64,
            skipped: v[2].max(0) as u64,
            ..Self::default()
        })
    }

    /// Divides the gradients of `params` by the scale; returns whether they are all finite.
    /// Updates the scale as PyTorch's `GradScaler.update` does.
    pub fn unscale(&mut self, params: &[Tensor]) -> bool {
        let inv = 1.0 / self.scale;
        let mut finite = true;
        tch::no_grad(|| {
            for p in params {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = g.g_mul_scalar_(inv);
                if finite && !bool::try_from(g.isfinite().all()).unwrap_or(false) {
                    finite = false;
                }
            }
        });
        if finite {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
            self.skipped += 1;
        }
        finite
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn scaler_skips_non_finite_steps_and_grows_after_good_ones() {
        let p = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let mut s = GradScaler {
            growth_interval: 2,
            ..Default::default()
        };
        (&p * 65536.0).sum(Kind::Float).backward();
        assert!(s.unscale(std::slice::from_ref(&p)));
        assert_eq!(Vec::<f32>::try_from(p.grad()).unwrap(), vec![1.0, 1.0]);
        assert_eq!(s.scale, 65536.0);
        assert!(s.unscale(std::slice::from_ref(&p)));
        assert_eq!(
            s.scale, 131072.0,
            "doubles after growth_interval good steps"
        );
        let mut g = p.grad();
        let _ = g.fill_(f64::INFINITY);
        assert!(!s.unscale(std::slice::from_ref(&p)));
        assert_eq!((s.scale, s.skipped), (65536.0, 1));
    }

    #[test]
    fn scaler_state_round_trips_exactly() {
        let s = GradScaler {
            scale: 3.0517578125e-5 * 3.0,
            good_steps: 17,
            skipped: 4,
            ..Default::default()
        };
        let mut sd: mae_models::checkpoint::StateDict = s.state().into_iter().collect();
        sd.insert(
            "other".into(),
            mae_models::TensorData::from_f32(vec![1], &[1.0]).unwrap(),
        );
        let back = GradScaler::take_state(&mut sd).unwrap();
        assert_eq!(back.scale.to_bits(), s.scale.to_bits());
        assert_eq!((back.good_steps, back.skipped), (17, 4));
        assert_eq!(sd.len(), 1, "only the scaler's entries are taken");
        assert!(GradScaler::take_state(&mut sd).is_none());
    }

    #[test]
    fn cpu_autocast_computes_linear_layers_in_bf16() {
        configure(Some(Autocast::Bf16), Device::Cpu).unwrap();
        let x = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([3, 4], (Kind::Float, Device::Cpu));
        let y = autocast(|| x.linear::<Tensor>(&w, None));
        let z = x.linear::<Tensor>(&w, None);
        configure(Some(Autocast::Fp32), Device::Cpu).unwrap();
        assert_eq!(y.kind(), Kind::BFloat16);
        assert_eq!(z.kind(), Kind::Float, "autocast is off again outside");
        assert_eq!(current(), Autocast::Fp32);
    }
}
