//! Execution providers: which one runs each graph, with which options, and what a GPU bundle must hold.
//!
//! Everything here is decided from the options and the manifest before ONNX Runtime is asked for a
//! provider, as plain data ([`ProviderPlan`]), so that the choices are tested on machines without a GPU;
//! [`super::open`] turns a plan into ort's provider objects.
//!
//! - `cuda`: every graph on the CUDA provider.
//! - `tensorrt`: the vision graph on TensorRT (its plain-attention variant, `vision-trt.onnx`, which
//!   TensorRT can build one engine of; CUDA registered after it for whatever it leaves), the decoder on
//!   CUDA: TensorRT cannot parse `GroupQueryAttention`, and a plain-operator decoder would copy the
//!   whole KV cache every step (the route TensorRT-LLM avoids with attention plugins).
//! - `auto`: TensorRT where its libraries are present, else CUDA, else the CPU, said on stderr. The
//!   only case where a missing GPU is not an error.

use std::path::{Path, PathBuf};

use crate::manifest::{Dtype, Manifest};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The best available: TensorRT, else CUDA, else the CPU (said on stderr).
    Auto,
    Cpu,
    Cuda,
    Tensorrt,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Auto => "auto",
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Tensorrt => "tensorrt",
        }
    }
}

/// GPU settings (`--gpu-id`, `--gpu-mem-limit`, `--tf32`, `--trt-cache`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuOptions {
    pub device_id: i32,
    /// Bytes the CUDA provider's arena may hold (None: no limit).
    pub memory_limit: Option<usize>,
    /// TF32 matmuls on Ampere and later (the CUDA provider's default); off for parity with the CPU.
    pub tf32: bool,
    /// Where TensorRT keeps its engines and timing cache (None: `trt-cache` in the model folder).
    pub trt_cache: Option<PathBuf>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self { device_id: 0, memory_limit: None, tf32: true, trt_cache: None }
    }
}

/// The two graphs, which may run on different providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Vision,
    Decoder,
}

/// One provider with its options, in registration order (the CPU is always ONNX Runtime's last resort).
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderPlan {
    Cuda {
        device_id: i32,
        memory_limit: Option<usize>,
        tf32: bool,
    },
    TensorRt {
        device_id: i32,
        fp16: bool,
        bf16: bool,
        cache_dir: PathBuf,
        /// `input:NxCxHxW` for the smallest, the typical and the largest tile batch.
        profile: [String; 3],
    },
}

/// The GPU libraries that must sit beside ONNX Runtime's core library for a device: ONNX Runtime
/// loads its providers from its own folder.
pub fn provider_libraries(device: Device) -> &'static [&'static str] {
    match device {
        Device::Cpu | Device::Auto => &[],
        Device::Cuda => &["libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so"],
        Device::Tensorrt => &[
            "libonnxruntime_providers_shared.so",
            "libonnxruntime_providers_cuda.so",
            "libonnxruntime_providers_tensorrt.so",
        ],
    }
}

/// Which of [`provider_libraries`] are not in `dir`.
pub fn missing_libraries(dir: &Path, device: Device) -> Vec<&'static str> {
    provider_libraries(device).iter().copied().filter(|lib| !dir.join(lib).is_file()).collect()
}

/// Tiles TensorRT's optimisation profile covers: one image's tiles plus its thumbnail at the model's
/// tile limit; the vision stage never runs a larger batch under TensorRT.
pub fn trt_max_tiles(m: &Manifest) -> usize {
    m.image.max_tiles as usize + 1
}

/// The folder TensorRT caches engines in: built once per GPU and model, reused at the next start.
pub fn trt_cache_dir(m: &Manifest, gpu: &GpuOptions) -> PathBuf {
    gpu.trt_cache.clone().unwrap_or_else(|| m.dir.join("trt-cache"))
}

/// The providers a stage's graph is registered with on `device` (already resolved: not `auto`).
pub fn plan(m: &Manifest, device: Device, stage: Stage, gpu: &GpuOptions) -> Vec<ProviderPlan> {
    let cuda = ProviderPlan::Cuda { device_id: gpu.device_id, memory_limit: gpu.memory_limit, tf32: gpu.tf32 };
    match (device, stage) {
        (Device::Cpu | Device::Auto, _) => Vec::new(),
        (Device::Cuda, _) | (Device::Tensorrt, Stage::Decoder) => vec![cuda],
        (Device::Tensorrt, Stage::Vision) => {
            let v = &m.vision;
            let shape = |n: usize| format!("{}:{n}x3x{}x{}", v.input, v.image_size, v.image_size);
            let max = trt_max_tiles(m);
            let trt = ProviderPlan::TensorRt {
                device_id: gpu.device_id,
                fp16: m.vision_dtype() == Dtype::Float16,
                bf16: m.vision_dtype() == Dtype::Bfloat16,
                cache_dir: trt_cache_dir(m, gpu),
                // 7 tiles: a 4:3 photo at the default limit (6 tiles + thumbnail), the common case.
                profile: [shape(1), shape(7.min(max)), shape(max)],
            };
            vec![trt, cuda]
        }
    }
}

/// The graph file a stage opens on `device`: under TensorRT the vision graph's plain-attention variant
/// where the folder has one.
pub fn graph_file(m: &Manifest, device: Device, stage: Stage) -> Option<&str> {
    match (device, stage) {
        (Device::Tensorrt, Stage::Vision) => m.vision.tensorrt.as_ref().map(|t| t.file.as_str()),
        _ => None,
    }
}

/// Why a model folder cannot run on `device` at all (None: it can), or a warning that it runs badly.
pub fn fit(m: &Manifest, device: Device) -> Fit {
    match (m.dtype, device) {
        (Dtype::Bfloat16 | Dtype::Int4Bfloat16, Device::Cpu) => Fit::No(format!(
            "{} is a {} export and ONNX Runtime's CPU provider has no bfloat16 kernels: use --device cuda or \
             tensorrt, or export --dtype float16 / float32 / int8 / int4 for the CPU",
            m.dir.display(),
            m.dtype
        )),
        (Dtype::Int4Float16, Device::Cpu) => Fit::Slow(format!(
            "{} is an int4-float16 export made for GPUs: on the CPU its float16 activations run without the int8 \
             kernels; export --dtype int4 for CPUs",
            m.dir.display()
        )),
        (Dtype::Int8 | Dtype::Int4, Device::Cuda | Device::Tensorrt) => Fit::Slow(format!(
            "{} is a {} export quantised for CPUs: its dynamic-quantisation operators run on the CPU under {}, with \
             copies around every matmul; export --dtype float16 (or bfloat16) for GPUs",
            m.dir.display(),
            m.dtype,
            device.name()
        )),
        (Dtype::Float32, Device::Cuda | Device::Tensorrt) => Fit::Slow(format!(
            "{} is a float32 export: ONNX Runtime's CUDA GroupQueryAttention takes float16 / bfloat16 only, so the \
             decoder's attention runs on the CPU; export --dtype float16 (or bfloat16) for GPUs",
            m.dir.display()
        )),
        _ => Fit::Yes,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fit {
    Yes,
    /// Runs, but not as a user of this device wants: said on stderr.
    Slow(String),
    No(String),
}

/// Devices a folder runs on, best first (`internvl info`).
pub fn devices_for(dtype: Dtype) -> &'static [&'static str] {
    match dtype {
        Dtype::Float16 | Dtype::Int4Float16 => &["tensorrt", "cuda", "cpu"],
        Dtype::Bfloat16 | Dtype::Int4Bfloat16 => &["tensorrt", "cuda"],
        Dtype::Float32 => &["cpu", "tensorrt", "cuda"],
        Dtype::Int8 | Dtype::Int4 => &["cpu"],
    }
}

/// A provider's registration error in one line that names what is missing: ONNX Runtime reports a
/// missing CUDA / cuDNN / TensorRT library as a `dlopen` message deep in its text.
pub fn explain(device: Device, message: &str) -> String {
    let message = message.replace(['\n', '\r'], " ");
    // The library dlopen could not find is the last one named before its "cannot open" (the message
    // also names the provider library that was being loaded).
    let cut = message.find("cannot open shared object").or_else(|| message.find("No such file"));
    let missing = cut.and_then(|at| {
        message[..at].split_whitespace().rev().find_map(|w| {
            let w = w.trim_matches(|c: char| !(c.is_ascii_alphanumeric() || "._-+".contains(c)));
            (w.starts_with("lib") && w.contains(".so")).then(|| w.to_string())
        })
    });
    let needs = match device {
        Device::Tensorrt => "TensorRT 10 for CUDA 13 (libnvinfer.so.10), CUDA 13 and cuDNN 9",
        _ => "CUDA 13 (libcudart.so.13, libcublasLt.so.13), cuDNN 9 (libcudnn.so.9) and an r580+ driver",
    };
    match missing {
        Some(lib) => format!(
            "--device {}: {lib} could not be loaded; ONNX Runtime 1.31's GPU providers need {needs}: install them or put \
             their folders on LD_LIBRARY_PATH",
            device.name()
        ),
        _ => format!("--device {}: the {} provider could not start: {message}", device.name(), device.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_names_the_missing_library() {
        let msg = "Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open \
                   shared object file: No such file or directory";
        let line = explain(Device::Cuda, msg);
        assert!(line.contains("libcublasLt.so.13 could not be loaded"), "{line}");
        assert!(!line.contains('\n'));
        let line = explain(Device::Tensorrt, "libnvinfer.so.10: cannot open shared object file");
        assert!(line.starts_with("--device tensorrt: libnvinfer.so.10 could not be loaded"), "{line}");
        assert!(line.contains("TensorRT 10"));
        let other = explain(Device::Cuda, "CUDA failure 100: no CUDA-capable device is detected");
        assert!(other.contains("could not start") && other.contains("no CUDA-capable device"), "{other}");
    }

    #[test]
    fn missing_libraries_lists_what_a_bundle_lacks() {
        let dir = std::env::temp_dir().join(format!("internvl-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(missing_libraries(&dir, Device::Cpu), Vec::<&str>::new());
        assert_eq!(missing_libraries(&dir, Device::Cuda).len(), 2);
        std::fs::write(dir.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        std::fs::write(dir.join("libonnxruntime_providers_cuda.so"), b"").unwrap();
        assert!(missing_libraries(&dir, Device::Cuda).is_empty());
        assert_eq!(missing_libraries(&dir, Device::Tensorrt), vec!["libonnxruntime_providers_tensorrt.so"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
