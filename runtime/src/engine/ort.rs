//! The ONNX Runtime backend: `libonnxruntime.so` loaded at run time (`ortlib.rs` finds it), on
//! the CPU or the CUDA execution provider.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail};

use crate::engine::backend::{output_roles, Backend, OutputTensor, RawOutputs};
use crate::engine::model::ModelMeta;
use crate::engine::settings::{Device, LoadOptions};
use ort::ep::ExecutionProvider;
use ort::session::Session;
use ort::value::Tensor;

pub(crate) struct OrtBackend {
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
    let path = crate::engine::ortlib::find(lib)?;
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
                    .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
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
        let mut raw = RawOutputs::new(take(self.roles.0)?, take(self.roles.1)?);
        for (i, name) in self.output_names.iter().enumerate() {
            if Some(i) == self.roles.0 || Some(i) == self.roles.1 {
                continue;
            }
            let Some(v) = outputs.get(name.as_str()) else {
                continue;
            };
            // Outputs that are not float32 tensors are not maps.
            let Ok((shape, data)) = v.try_extract_tensor::<f32>() else {
                continue;
            };
            raw.maps.push(OutputTensor {
                name: name.clone(),
                shape: shape.iter().map(|&d| d.max(0) as usize).collect(),
                values: data.to_vec(),
            });
        }
        Ok(raw)
    }
}
