//! What every handler shares: the configuration, the loaded model (once loaded), the channel to the
//! engine thread, the admission counters and the draining flag.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Instant;

use internvl::{Model, Sequence};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::error::ApiError;
use crate::ServeConfig;

pub(crate) struct AppState {
    pub(crate) cfg: ServeConfig,
    pub(crate) model: OnceLock<Arc<Model>>,
    pub(crate) media_root: Option<PathBuf>,
    pub(crate) submit: std::sync::Mutex<Option<mpsc::Sender<Sequence>>>,
    /// Admitted requests (running or waiting).
    pub(crate) in_flight: AtomicUsize,
    /// Their images' decoded pixels.
    pub(crate) pixels_in_flight: AtomicU64,
    pub(crate) draining: AtomicBool,
    /// When the engine thread last went round its loop (ms since start): liveness.
    pub(crate) heartbeat: AtomicU64,
    pub(crate) started: Instant,
    pub(crate) prometheus: PrometheusHandle,
}

impl AppState {
    pub(crate) fn model(&self) -> Result<&Arc<Model>, ApiError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        self.model.get().ok_or_else(|| ApiError::unavailable("Loading model"))
    }

    pub(crate) fn engine_alive(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        self.model.get().is_none() || now.saturating_sub(self.heartbeat.load(Ordering::Relaxed)) < 120_000
    }
}
