//! `internvl serve`: the OpenAI Chat Completions API over HTTP for many clients from one loaded model.
//!
//! HTTP only: routes, limits, auth, SSE, metrics. One engine thread owns the [`internvl::Engine`] and
//! steps every admitted request together (continuous batching); request handlers decode images and
//! tokenise on tokio's blocking pool, hand a [`internvl::Sequence`] to the engine thread, and stream its
//! events back.
//!
//! ```text
//! lib.rs            ServeConfig, the listener, graceful shutdown
//! chat.rs           POST /v1/chat/completions (one body or SSE)
//! openai.rs         the request: parsed and checked into Content + Params; media policy
//! types.rs          the response bodies (completion, chunk, usage, model list, error envelope)
//! admission.rs      slots and the pixel budget, held until the response ends
//! engine_thread.rs  the thread that owns the Engine
//! auth.rs, probes.rs, fetch.rs (remote media), error.rs (ApiError), state.rs (AppState)
//! ```

mod admission;
mod auth;
mod chat;
mod engine_thread;
pub mod error;
pub mod fetch;
mod listener;
pub mod openai;
mod probes;
mod state;
pub mod types;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use internvl::error::{ErrorKind, WithKind};
use internvl::runtime::RuntimeOptions;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use error::ApiError;
use listener::ConnectionLimits;
use state::AppState;

/// Default request body limit: a few photos as base64 (a 12 MP JPEG is about 5 MB, 6.7 MB encoded).
pub const DEFAULT_BODY_LIMIT: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: PathBuf,
    pub runtime: RuntimeOptions,
    pub addr: SocketAddr,
    /// Requests that run at once (KV-cache rows).
    pub parallel: usize,
    /// Requests that may wait for a row; beyond parallel + queue: 429.
    pub queue: usize,
    pub api_key: Option<String>,
    pub body_limit: usize,
    pub media_root: Option<PathBuf>,
    pub vision_batch: usize,
    pub prefill_chunk: usize,
    pub media_cache_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM / SIGINT.
    pub grace_period: u64,
    /// Seconds between SSE keep-alive comments.
    pub keep_alive: u64,
    /// See [`EngineConfig::exact`].
    pub exact: bool,
    /// http(s) image URLs: fetched under these rules, or refused (None).
    pub remote_media: Option<fetch::RemoteMedia>,
    /// Decoded image pixels all admitted requests may hold at once (3 bytes each); a request that would
    /// pass it gets 429. Bounds what queued requests' images cost, whatever their files compress to.
    pub max_pixels_in_flight: u64,
    /// Connections open at once (lowered to what the open-file limit allows).
    pub max_connections: usize,
    pub timeouts: Timeouts,
}

/// How long a client may keep the server waiting at each point of an exchange.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For a request's headers, and for the next request on an idle keep-alive connection.
    pub header: Duration,
    /// For the whole request body (a silent or dripping body is cut then).
    pub body: Duration,
    /// A stream's next chunk waiting for the client to read the ones before it; then the stream is cut
    /// and its request cancelled.
    pub send: Duration,
}

fn recorder() -> Result<PrometheusHandle> {
    let seconds = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0];
    let itl = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0];
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("internvl_inter_token_latency_seconds".into()),
            &itl,
        )?
        .set_buckets(&seconds)?;
    builder.install_recorder().context("installing the metrics recorder")
}

/// Binds, answers `/health` with 503 while the model loads, then serves until SIGTERM / SIGINT, and
/// drains: no new requests (readiness 503), in-flight ones finish within the grace period.
pub fn serve(cfg: ServeConfig, on_listening: impl FnOnce(SocketAddr)) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let swept = internvl::media::video::sweep_temporary_files();
    if swept > 0 {
        eprintln!("internvl serve: removed {swept} temporary video file(s) left by a process that was killed");
    }
    let served = runtime.block_on(run(cfg, on_listening));
    // The grace period is over (or serving failed): whatever still runs (a video decode on the blocking
    // pool, a decoder step) is abandoned, not waited for, so the process ends within the grace period; its
    // temporary files go with it.
    runtime.shutdown_timeout(Duration::from_millis(200));
    internvl::media::video::remove_temporary_files();
    served
}

async fn run(cfg: ServeConfig, on_listening: impl FnOnce(SocketAddr)) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .with_context(|| format!("--host / --port: cannot listen on {}", cfg.addr))
        .kind(ErrorKind::Usage)?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let room = listener::connection_room();
    let max_connections = cfg.max_connections.min(room);
    if max_connections < cfg.max_connections {
        eprintln!(
            "internvl serve: --max-connections {} lowered to {max_connections} (the open-file limit leaves room for no more)",
            cfg.max_connections
        );
    }
    let media_root = match &cfg.media_root {
        Some(dir) => Some(std::fs::canonicalize(dir).with_context(|| format!("--media-root {}", dir.display()))?),
        None => None,
    };
    let state = Arc::new(AppState {
        model: OnceLock::new(),
        media_root,
        submit: std::sync::Mutex::new(None),
        in_flight: AtomicUsize::new(0),
        pixels_in_flight: AtomicU64::new(0),
        draining: AtomicBool::new(false),
        heartbeat: AtomicU64::new(0),
        started: Instant::now(),
        prometheus: recorder()?,
        cfg,
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(probes::models))
        .route("/health", get(probes::health))
        .route("/health/live", get(probes::live))
        .route("/health/ready", get(probes::health))
        .route("/metrics", get(probes::metrics_text))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such route").code("not_found")
        })
        .with_state(Arc::clone(&state));
    on_listening(addr);

    // Load on a thread of its own, then start the engine thread: /health answers meanwhile.
    let loader = Arc::clone(&state);
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = loaded_tx.send(engine_thread::start_engine(&loader));
    });
    let shutdown = Arc::clone(&state);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grace = state.cfg.grace_period;
    // Draining: new requests get 503 (so does readiness) while the in-flight ones finish, for at most the
    // grace period; then the listener closes and open connections get a second.
    tokio::spawn(async move {
        signal().await;
        shutdown.draining.store(true, Ordering::Relaxed);
        let n = shutdown.in_flight.load(Ordering::Relaxed);
        eprintln!("internvl serve: shutting down, finishing {n} request(s) (at most {grace} s)");
        let deadline = Instant::now() + Duration::from_secs(grace);
        while shutdown.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = shutdown.in_flight.load(Ordering::Relaxed);
        if left > 0 {
            eprintln!("internvl serve: grace period of {grace} s over, {left} request(s) cut");
        }
        let _ = stop_tx.send(true);
    });
    let limits = ConnectionLimits { max_connections, header_timeout: state.cfg.timeouts.header };
    let server = listener::serve(listener, app, limits, stop_rx, Duration::from_secs(1));
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r,
        loaded = loaded_rx => {
            match loaded {
                Ok(Ok(())) => eprintln!("internvl serve: model loaded, listening on http://{addr}"),
                Ok(Err(e)) => return Err(e),
                Err(_) => anyhow::bail!("the model loader stopped"),
            }
            server.await
        }
    }
}

async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
