//! What the library has to say that is not an error: which device `auto` chose, a GPU that did not
//! start, ONNX Runtime's own log lines, TensorRT building its engines. The library never prints; a
//! front end installs one handler per process ([`set_handler`]) and renders these as it likes (the
//! `internvl` binary writes today's stderr lines and draws a spinner while engines build). Without a
//! handler, notices are dropped.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::runtime::Device;

#[derive(Debug, Clone)]
pub enum Notice {
    /// `Device::Auto` resolved to `device`; `passed_over` says why each faster device was not used.
    DeviceChosen { device: Device, passed_over: Vec<String> },
    /// Under `Device::Auto`, the stages did not start on `device`; `next` is tried.
    DeviceFailed { device: Device, error: String, next: Device },
    /// The model runs on the device it got, but badly (e.g. bf16 weights on a CPU without bf16).
    Slow(String),
    /// A model folder without the TensorRT variant of its vision graph: attention runs on CUDA.
    NoTensorRtVariant { model_dir: PathBuf, file: String },
    /// TensorRT builds engines for `graph` into `cache` (minutes, once per GPU) ...
    BuildingEngines { graph: String, cache: PathBuf },
    /// ... and is done (or failed) with them.
    EnginesBuilt,
    /// One of ONNX Runtime's log lines at warning level or above (shown with `--verbose`).
    RuntimeLog { level: String, location: String, message: String },
}

type Handler = Box<dyn Fn(&Notice) + Send + Sync>;

static HANDLER: OnceLock<Handler> = OnceLock::new();

/// Sends every later notice of this process to `handler`. The first call wins: one process has one
/// front end.
pub fn set_handler(handler: impl Fn(&Notice) + Send + Sync + 'static) {
    let _ = HANDLER.set(Box::new(handler));
}

pub(crate) fn emit(notice: Notice) {
    if let Some(handler) = HANDLER.get() {
        handler(&notice);
    }
}
