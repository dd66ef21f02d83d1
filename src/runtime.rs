//! The only place that knows ONNX Runtime: loading the shared library, execution providers, and
//! session options. Every graph is opened through [`open_graph`], which also picks between a portable
//! graph and its variant on this crate's own kernels.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use ort::environment::{Environment, GlobalThreadPoolOptions};
use ort::ep::{self, ExecutionProvider};
use ort::logging::LogLevel;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{Outlet, ValueType};

use crate::error::{ErrorKind, WithKind};
use crate::kernels;
use crate::manifest::{AmxVariant, Manifest};

/// The ONNX Runtime release the graphs and this binary are built for.
pub const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
    Tensorrt,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Tensorrt => "tensorrt",
        }
    }
}

/// Whose attention kernels the graphs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, threads: 0, attention: AttentionKernels::Auto }
    }
}

static ENVIRONMENT: OnceLock<Result<(PathBuf, Environment), String>> = OnceLock::new();

/// Most intra-op threads: ONNX Runtime starts every one of them at load (100000 crash it), and more threads
/// than cores only slow a step down.
pub const MAX_THREADS: usize = 1024;

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
                eprintln!("onnxruntime: {level:?} {location}: {message}");
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

/// Opens a stage's graph, `file`, or its AMX variant when `opts.attention` asks for it (or leaves it
/// to us) and it can run here. Returns the session and the file it opened.
pub fn open_graph(
    m: &Manifest,
    file: &str,
    amx: Option<&AmxVariant>,
    opts: &RuntimeOptions,
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
    match (opts.attention, why_not, amx) {
        (AttentionKernels::Amx, Some(why), _) => Err(anyhow!("attention amx: {why}")).kind(ErrorKind::Usage),
        (AttentionKernels::Amx | AttentionKernels::Auto, None, Some(amx)) => {
            Ok((open(&m.path(&amx.file), opts, true)?, amx.file.clone()))
        }
        _ => Ok((open(&m.path(file), opts, false)?, file.to_string())),
    }
}

/// One graph on the requested device, with this crate's kernels registered when `kernels`. Asking for a
/// GPU provider that this ONNX Runtime build does not have is an error, never a silent fallback to CPU.
fn open(path: &Path, opts: &RuntimeOptions, kernels: bool) -> Result<Session> {
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
    let provider = match opts.device {
        Device::Cpu => None,
        Device::Cuda => require_provider::<ep::CUDA>(opts.device).map(|()| Some(ep::CUDA::default().build()))?,
        Device::Tensorrt => {
            require_provider::<ep::TensorRT>(opts.device).map(|()| Some(ep::TensorRT::default().build()))?
        }
    };
    if let Some(provider) = provider {
        builder =
            builder.with_execution_providers([provider.error_on_failure()]).map_err(ort_err).with_context(what)?;
    }
    builder.commit_from_file(path).map_err(ort_err).with_context(what)
}

fn require_provider<E: ExecutionProvider>(device: Device) -> Result<()> {
    let available = E::is_available().map_err(ort_err)?;
    if !available {
        let lib =
            ENVIRONMENT.get().and_then(|r| r.as_ref().ok()).map(|(p, _)| p.display().to_string()).unwrap_or_default();
        bail!(
            "--device {}: the {} execution provider is not available in the ONNX Runtime at {lib} (a GPU build of ONNX Runtime is needed)",
            device.name(),
            E::NAME
        );
    }
    Ok(())
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
