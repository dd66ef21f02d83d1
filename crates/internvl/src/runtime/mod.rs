//! The only place that knows ONNX Runtime: loading the shared library, execution providers, and
//! session options. Every graph is opened through [`open_graph`], which also picks between a portable
//! graph and its variants (this crate's own kernels on the CPU, plain attention for TensorRT).

pub mod providers;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use ort::environment::{Environment, GlobalThreadPoolOptions};
use ort::ep::{self, ExecutionProvider, ExecutionProviderDispatch};
use ort::logging::LogLevel;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{Outlet, ValueType};

use crate::error::{ErrorKind, WithKind};
use crate::kernels;
use crate::limits::MAX_THREADS;
use crate::manifest::{AmxVariant, Manifest};
use crate::notice::{self, Notice};
pub use providers::{Device, GpuOptions, Stage};
use providers::{Fit, ProviderPlan};

/// The ONNX Runtime release the graphs and this binary are built for.
pub const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";

/// Whose attention kernels the graphs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernels {
    /// This crate's AMX kernels where the model folder has their graphs and the CPU runs them, else
    /// ONNX Runtime's.
    Auto,
    /// ONNX Runtime's (`MultiHeadAttention`, `GroupQueryAttention`): the portable graphs.
    Onnx,
    /// This crate's AMX kernels ([`crate::kernels`]); an error where they cannot run.
    Amx,
}

#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub device: Device,
    /// Intra-op threads; 0 = one per available core.
    pub threads: usize,
    pub attention: AttentionKernels,
    pub gpu: GpuOptions,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, threads: 0, attention: AttentionKernels::Auto, gpu: GpuOptions::default() }
    }
}

/// `opts` with `auto` replaced by the device this model runs on here, after checking that the model
/// can run on it at all; `auto` says on stderr what it chose and why. (A model that runs badly there is
/// said once it has started: [`providers::fit`].)
pub fn resolve(m: &Manifest, opts: &RuntimeOptions) -> Result<RuntimeOptions> {
    let mut out = opts.clone();
    if opts.device == Device::Auto {
        let mut why = Vec::new();
        out.device = Device::Cpu;
        for device in [Device::Tensorrt, Device::Cuda] {
            let fits = usable(device, opts.threads).and_then(|()| match providers::fit(m, device) {
                Fit::No(why) => Err(why),
                _ => Ok(()),
            });
            match fits {
                Ok(()) => {
                    out.device = device;
                    break;
                }
                Err(e) => why.push(format!("{}: {e}", device.name())),
            }
        }
        let passed_over = if out.device == Device::Cpu { why } else { Vec::new() };
        notice::emit(Notice::DeviceChosen { device: out.device, passed_over });
    }
    match providers::fit(m, out.device) {
        Fit::No(why) => Err(anyhow!("{why}")).kind(ErrorKind::Usage),
        Fit::Slow(_) | Fit::Yes => Ok(out),
    }
}

/// The ONNX Runtime library this process loads (loading it).
pub fn library() -> Result<PathBuf> {
    Ok(init(0)?.0.to_path_buf())
}

/// Whether `device`'s provider is in this ONNX Runtime build and its libraries are beside it (not
/// whether CUDA itself loads: that shows when a session starts, and is then named by the error).
pub fn device_status(device: Device) -> std::result::Result<(), String> {
    usable(device, 0)
}

/// `threads`: the process's intra-op threads, in case this call is the one that loads ONNX Runtime.
fn usable(device: Device, threads: usize) -> std::result::Result<(), String> {
    let (lib, _) = init_unmarked(threads).map_err(|e| e.to_string())?;
    let available = match device {
        Device::Cuda => ep::CUDA::is_available(),
        Device::Tensorrt => ep::TensorRT::is_available(),
        Device::Cpu | Device::Auto => Ok(true),
    }
    .unwrap_or(false);
    if !available {
        return Err(format!(
            "the {} execution provider is not in the ONNX Runtime at {} (a GPU build is needed: scripts/gpu_bundle.sh \
             assembles one)",
            device.name(),
            lib.display()
        ));
    }
    let dir = lib.parent().unwrap_or(Path::new("."));
    let missing = providers::missing_libraries(dir, device);
    if !missing.is_empty() {
        return Err(format!(
            "{} missing beside {} (scripts/gpu_bundle.sh assembles the GPU bundle)",
            missing.join(", "),
            lib.display()
        ));
    }
    Ok(())
}

/// The memory the decoder's KV cache lives in: where the decoder runs (CUDA also under TensorRT,
/// which does not take the decoder).
pub fn kv_memory(opts: &RuntimeOptions) -> Result<MemoryInfo<'static>> {
    match opts.device {
        Device::Cpu | Device::Auto => Ok(MemoryInfo::default()),
        Device::Cuda | Device::Tensorrt => {
            MemoryInfo::new(AllocationDevice::CUDA, opts.gpu.device_id, AllocatorType::Device, MemoryType::Default)
                .map_err(ort_err)
        }
    }
}

static ENVIRONMENT: OnceLock<Result<(PathBuf, Environment), String>> = OnceLock::new();

/// ONNX Runtime's own log lines go to stderr only when asked for (`--verbose`); its errors still come
/// back as errors of the call that failed.
static ORT_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Shows ONNX Runtime's warnings (and worse) on stderr, one line each, prefixed `onnxruntime:`.
pub fn show_runtime_logs(on: bool) {
    ORT_LOGS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Resolves `threads = 0` to one thread per available core.
pub fn thread_count(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    } else {
        threads
    }
}

/// Loads ONNX Runtime once per process. The shipped bundle keeps the library beside the binary, so
/// no environment variable is needed; `ORT_DYLIB_PATH` still overrides it for unusual layouts.
///
/// All sessions share one global intra-op thread pool of `threads` threads (the first call decides):
/// with a pool per session, the vision session's threads keep spinning after their work and steal
/// the cores the decoder needs next.
pub fn init(threads: usize) -> Result<(&'static Path, &'static Environment)> {
    if threads > MAX_THREADS {
        return Err(anyhow!("{threads} threads is more than the limit of {MAX_THREADS}")).kind(ErrorKind::Usage);
    }
    init_unmarked(threads).kind(ErrorKind::Internal)
}

fn init_unmarked(threads: usize) -> Result<(&'static Path, &'static Environment)> {
    let res = ENVIRONMENT.get_or_init(|| {
        let path = find_library().map_err(|e| e.to_string())?;
        let fail = |e: ort::Error| format!("starting ONNX Runtime from {}: {e}", path.display());
        // The library must be loaded before any other ort call (thread pool options included).
        let builder =
            ort::init_from(&path).map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?;
        let pool = GlobalThreadPoolOptions::default()
            .with_intra_threads(thread_count(threads))
            .and_then(|p| p.with_inter_threads(1))
            .map_err(fail)?;
        let logger: ort::logging::LoggerFunction = std::sync::Arc::new(|level, _category, _id, location, message| {
            if ORT_LOGS.load(std::sync::atomic::Ordering::Relaxed) && level >= LogLevel::Warning {
                let message = message.replace(['\n', '\r'], " ");
                let (level, location) = (format!("{level:?}"), location.to_string());
                notice::emit(Notice::RuntimeLog { level, location, message });
            }
        });
        let env =
            builder.with_name("internvl").with_global_thread_pool(pool).with_logger(logger).build().map_err(fail)?;
        env.set_log_level(LogLevel::Warning);
        Ok((path, env))
    });
    match res {
        Ok((p, env)) => Ok((p.as_path(), env)),
        Err(e) => Err(anyhow!("{e}")),
    }
}

fn find_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("ORT_DYLIB_PATH={} does not exist", p.display());
    }
    let exe = std::env::current_exe().context("locating the running binary")?;
    let mut tried = Vec::new();
    // Beside the binary (the shipped bundle, and target/<profile>/ where build.rs copies it), and one
    // level up for test binaries in target/<profile>/deps.
    for dir in exe.ancestors().skip(1).take(2) {
        for name in [ORT_LIBRARY, "libonnxruntime.so"] {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
            tried.push(p);
        }
    }
    bail!(
        "ONNX Runtime library not found (looked for {}); put {ORT_LIBRARY} beside the binary or set ORT_DYLIB_PATH",
        tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// Opens a stage's graph, `file`, or a variant: the AMX one when `opts.attention` asks for it (or leaves
/// it to us) and it can run here, the TensorRT one under TensorRT. Returns the session and the file it
/// opened. `opts.device` must be resolved ([`resolve`]).
pub fn open_graph(
    m: &Manifest,
    file: &str,
    amx: Option<&AmxVariant>,
    opts: &RuntimeOptions,
    stage: Stage,
) -> Result<(Session, String)> {
    let why_not = if opts.device != Device::Cpu {
        Some(format!("the AMX kernels run on the CPU and --device is {}", opts.device.name()))
    } else if amx.is_none() {
        Some(format!(
            "{} has no AMX variant of {file} (written by int8 / int4 exports with 64- or 128-wide attention heads)",
            m.dir.display()
        ))
    } else if !kernels::amx_available() {
        Some("this CPU or OS has no AMX-BF16 tiles".into())
    } else {
        None
    };
    let plan = providers::plan(m, opts.device, stage, &opts.gpu);
    match (opts.attention, why_not, amx) {
        (AttentionKernels::Amx, Some(why), _) => Err(anyhow!("attention amx: {why}")).kind(ErrorKind::Usage),
        (AttentionKernels::Amx | AttentionKernels::Auto, None, Some(amx)) => {
            Ok((open(&m.path(&amx.file), opts, &plan, true)?, amx.file.clone()))
        }
        _ => {
            let variant = providers::graph_file(m, opts.device, stage);
            if variant.is_none() && opts.device == Device::Tensorrt && stage == Stage::Vision {
                notice::emit(Notice::NoTensorRtVariant { model_dir: m.dir.clone(), file: file.to_string() });
            }
            let file = variant.unwrap_or(file);
            Ok((open(&m.path(file), opts, &plan, false)?, file.to_string()))
        }
    }
}

/// One graph with the providers of `plan` (none: the CPU), with this crate's kernels registered when
/// `kernels`. Asking for a GPU provider that cannot start is an error naming what is missing, never a
/// silent fallback to CPU.
fn open(path: &Path, opts: &RuntimeOptions, plan: &[ProviderPlan], kernels: bool) -> Result<Session> {
    let (_, env) = init(opts.threads)?;
    let what = || format!("opening {}", path.display());
    let mut builder = Session::builder(env)
        .map_err(ort_err)
        .with_context(what)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(ort_err)
        .with_context(what)?;
    if kernels {
        let domain = kernels::domain().map_err(ort_err).with_context(what)?;
        builder = builder.with_operators(domain).map_err(ort_err).with_context(what)?;
    }
    if plan.is_empty() {
        return builder.commit_from_file(path).map_err(ort_err).with_context(what);
    }
    let device = opts.device;
    usable(device, opts.threads).map_err(|e| anyhow!("--device {}: {e}", device.name())).kind(ErrorKind::Usage)?;
    let mut building = None;
    let mut created: Option<PathBuf> = None;
    let mut eps: Vec<ExecutionProviderDispatch> = Vec::new();
    for p in plan {
        match p {
            ProviderPlan::Cuda { device_id, memory_limit, tf32 } => {
                let mut cuda = ep::CUDA::default()
                    .with_device_id(*device_id)
                    .with_tf32(*tf32)
                    // The tile batch changes from call to call: no exhaustive cuDNN search per new shape.
                    .with_conv_algorithm_search(ep::cuda::ConvAlgorithmSearch::Heuristic);
                if let Some(limit) = memory_limit {
                    cuda = cuda.with_memory_limit(*limit);
                }
                eps.push(cuda.build().error_on_failure());
            }
            ProviderPlan::TensorRt { device_id, fp16, bf16, cache_dir, profile } => {
                if !cache_dir.exists() {
                    created = Some(cache_dir.clone());
                }
                std::fs::create_dir_all(cache_dir)
                    .with_context(|| format!("--trt-cache {}: cannot create the folder", cache_dir.display()))
                    .kind(ErrorKind::Usage)?;
                let cached = std::fs::read_dir(cache_dir)
                    .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".engine")))
                    .unwrap_or(false);
                if !cached {
                    building = Some(cache_dir.clone());
                }
                let dir = cache_dir.display().to_string();
                let trt = ep::TensorRT::default()
                    .with_device_id(*device_id)
                    .with_fp16(*fp16)
                    .with_bf16(*bf16)
                    .with_layer_norm_fp32_fallback(*fp16)
                    .with_engine_cache(true)
                    .with_engine_cache_path(&dir)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&dir)
                    .with_profile_min_shapes(&profile[0])
                    .with_profile_opt_shapes(&profile[1])
                    .with_profile_max_shapes(&profile[2]);
                eps.push(trt.build().error_on_failure());
            }
        }
    }
    // A folder made for engines that then failed to start holds nothing: not left in the model folder.
    let forget = |e: anyhow::Error| {
        if let Some(dir) = &created {
            let _ = std::fs::remove_dir(dir); // only if still empty
        }
        e
    };
    builder = builder
        .with_execution_providers(eps)
        .map_err(|e| anyhow!("{}", providers::explain(device, &e.to_string())))
        .with_context(what)
        .map_err(forget)?;
    if let Some(cache) = &building {
        let graph = path.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
        notice::emit(Notice::BuildingEngines { graph, cache: cache.clone() });
    }
    let session = builder.commit_from_file(path).map_err(|e| anyhow!("{}", providers::explain(device, &e.to_string())));
    if building.is_some() {
        notice::emit(Notice::EnginesBuilt);
    }
    session.with_context(what).map_err(forget)
}

/// ort's errors carry the builder they failed on (not `Sync`), so keep only the message.
pub fn ort_err<R>(e: ort::Error<R>) -> anyhow::Error {
    anyhow!("{e}")
}

/// Compares a graph input's or output's declared shape with the manifest's dims (`None`: any size), so a
/// manifest from another model fails at load, naming the file, not at the first run.
pub fn check_shape(path: &Path, outlets: &[Outlet], name: &str, want: &[Option<usize>]) -> Result<()> {
    let outlet = outlets.iter().find(|o| o.name() == name);
    let Some(ValueType::Tensor { shape, .. }) = outlet.map(|o| o.dtype()) else {
        bail!("{} has no tensor {name:?}: manifest and graph are from different models", path.display());
    };
    let fits = shape.len() == want.len()
        && shape.iter().zip(want).all(|(&got, want)| want.is_none_or(|w| i64::try_from(w) == Ok(got)));
    if !fits {
        let show = |d: Option<usize>| d.map_or("_".to_string(), |d| d.to_string());
        bail!(
            "{}: {name} has shape {:?} but the manifest says [{}]: manifest and graph are from different models (export again)",
            path.display(),
            &shape[..],
            want.iter().map(|&d| show(d)).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}
