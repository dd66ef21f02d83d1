//! `internvl serve`: the OpenAI Chat Completions API over HTTP for many clients from one loaded model.
//!
//! HTTP only: request parsing, limits, auth, SSE, metrics. One engine thread owns the [`Engine`] and
//! steps every admitted request together (continuous batching); request handlers decode images and
//! tokenise on tokio's blocking pool, hand a [`internvl::Sequence`] to the engine thread, and stream its
//! events back. A client that goes away drops its receiver, and the engine cancels the sequence at its
//! next step, whatever stage it is in.

pub mod error;
pub mod fetch;
pub mod openai;
pub mod types;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{json, Value};
use tokio::sync::mpsc as tmpsc;

use error::ApiError;
use internvl::engine::{Engine, EngineConfig, Event, Sequence, Sink};
use internvl::error::{ErrorKind, WithKind};
use internvl::model::Model;
use internvl::runtime::RuntimeOptions;
use types::{Delta, ModelCard, ModelList, Reply};

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
}

struct AppState {
    cfg: ServeConfig,
    model: OnceLock<Arc<Model>>,
    media_root: Option<PathBuf>,
    submit: std::sync::Mutex<Option<mpsc::Sender<Sequence>>>,
    /// Admitted requests (running or waiting).
    in_flight: AtomicUsize,
    /// Their images' decoded pixels.
    pixels_in_flight: AtomicU64,
    draining: AtomicBool,
    /// When the engine thread last went round its loop (ms since start): liveness.
    heartbeat: AtomicU64,
    started: Instant,
    prometheus: PrometheusHandle,
}

impl AppState {
    fn model(&self) -> Result<&Arc<Model>, ApiError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        self.model.get().ok_or_else(|| ApiError::unavailable("Loading model"))
    }

    fn engine_alive(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        self.model.get().is_none() || now.saturating_sub(self.heartbeat.load(Ordering::Relaxed)) < 120_000
    }
}

/// A sequence's events into a tokio channel; closed when the request's handler or stream is dropped.
struct ChannelSink(tmpsc::UnboundedSender<Event>);

impl Sink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// Releases the request's admission slot and pixel budget when the response (or its stream) ends,
/// however it ends.
struct Admission {
    state: Arc<AppState>,
    pixels: u64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.state.pixels_in_flight.fetch_sub(self.pixels, Ordering::Relaxed);
    }
}

impl Admission {
    /// Takes `pixels` of the server's budget, or says to come back later.
    fn reserve_pixels(&mut self, pixels: u64) -> Result<(), ApiError> {
        let budget = self.state.cfg.max_pixels_in_flight;
        let before = self.state.pixels_in_flight.fetch_add(pixels, Ordering::Relaxed);
        self.pixels += pixels;
        if before + pixels > budget && before > 0 {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "server_overloaded",
                format!(
                    "the images of the requests in progress are at the server's limit of {budget} pixels; retry later"
                ),
            )
            .code("server_overloaded");
            e.retry_after = Some(1);
            return Err(e);
        }
        Ok(())
    }
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
    runtime.block_on(run(cfg, on_listening))
}

async fn run(cfg: ServeConfig, on_listening: impl FnOnce(SocketAddr)) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .with_context(|| format!("--host / --port: cannot listen on {}", cfg.addr))
        .kind(ErrorKind::Usage)?;
    let addr = listener.local_addr().context("reading the bound address")?;
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
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such route").code("not_found")
        })
        .layer(DefaultBodyLimit::max(state.cfg.body_limit))
        .with_state(Arc::clone(&state));
    on_listening(addr);

    // Load on a thread of its own, then start the engine thread: /health answers meanwhile.
    let loader = Arc::clone(&state);
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = loaded_tx.send(start_engine(&loader));
    });
    let shutdown = Arc::clone(&state);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let grace = state.cfg.grace_period;
    // Draining: new requests get 503 (so does readiness) while the in-flight ones finish, for at most the
    // grace period; then the listener closes.
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
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
    let server = async move {
        let graceful = server.into_future();
        tokio::pin!(graceful);
        tokio::select! {
            r = &mut graceful => r.context("serving"),
            () = async {
                let _ = stop_rx.wait_for(|&s| s).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            } => Ok(()),
        }
    };
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

fn start_engine(state: &Arc<AppState>) -> Result<()> {
    let cfg = &state.cfg;
    let model = Arc::new(Model::load(&cfg.model, &cfg.runtime)?);
    model.set_media_cache_bytes(cfg.media_cache_bytes);
    let engine = Engine::new(
        Arc::clone(&model),
        EngineConfig {
            rows: cfg.parallel,
            vision_batch: cfg.vision_batch,
            prefill_chunk: cfg.prefill_chunk,
            exact: cfg.exact,
        },
    )?;
    let (tx, rx) = mpsc::channel::<Sequence>();
    *state.submit.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    let beat = Arc::clone(state);
    std::thread::Builder::new()
        .name("internvl-engine".into())
        .spawn(move || engine_loop(engine, rx, &beat))
        .context("starting the engine thread")?;
    let _ = state.model.set(model);
    Ok(())
}

/// The engine thread: takes new sequences, steps while there is work, waits (with a heartbeat) when idle.
fn engine_loop(mut engine: Engine, rx: mpsc::Receiver<Sequence>, state: &AppState) {
    loop {
        state.heartbeat.store(state.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        while let Ok(seq) = rx.try_recv() {
            engine.submit(seq);
        }
        if engine.has_work() {
            engine.step();
            continue;
        }
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(seq) => engine.submit(seq),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn authorized(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.cfg.api_key else { return Ok(()) };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), key.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", "missing or invalid API key")
            .code("invalid_api_key"))
    }
}

/// Compares without an early exit, so the time taken says nothing about how much of the key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &y) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ y);
    }
    diff == 0
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    metrics::counter!("internvl_http_requests_total", "route" => "chat_completions").increment(1);
    match chat(state, headers, body).await {
        Ok(r) => r,
        Err(e) => {
            let mut r = e.into_response();
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                // The unread rest of the body is still on the connection, which the server then drops:
                // saying so keeps a client from sending its next request on it.
                r.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
            }
            r
        }
    }
}

async fn chat(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorized(&state, &headers)?;
    let model = Arc::clone(state.model()?);
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is over the limit of {} bytes", state.cfg.body_limit),
            )
            .code("request_too_large")
        } else {
            ApiError::invalid(format!("cannot read the request body: {r}"))
        }
    })?;
    let body: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    if let Some(name) = body.get("model").and_then(Value::as_str) {
        if name != model.name() && !name.is_empty() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found_error",
                format!("model {name:?} is not served here (this server serves {:?})", model.name()),
            )
            .param("model")
            .code("model_not_found"));
        }
    }
    let ctx = model.manifest.decoder.max_context;
    let policy =
        openai::MediaPolicy { media_root: state.media_root.as_deref(), remote: state.cfg.remote_media.is_some() };
    let req = openai::parse(&body, &policy, model.manifest.generation.max_new_tokens, ctx)?;

    // Admission: running + waiting bounded; the rest are told to come back.
    let limit = state.cfg.parallel + state.cfg.queue;
    if state.in_flight.fetch_add(1, Ordering::Relaxed) >= limit {
        state.in_flight.fetch_sub(1, Ordering::Relaxed);
        metrics::counter!("internvl_requests_rejected_total").increment(1);
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "server_overloaded",
            format!("the server is busy ({limit} requests running or waiting); retry later"),
        )
        .code("server_overloaded");
        e.retry_after = Some(1);
        return Err(e);
    }
    let mut admission = Admission { state: Arc::clone(&state), pixels: 0 };

    let (tx, rx) = tmpsc::unbounded_channel();
    let openai::ChatRequest { mut content, params, stream, include_usage, images, video } = req;
    // Remote images are fetched here, inside the admission slot; a client that goes away cancels this.
    let mut image_bytes = Vec::with_capacity(images.len());
    for source in images {
        image_bytes.push(match (source, &state.cfg.remote_media) {
            (openai::ImageSource::Bytes(b), _) => b,
            (openai::ImageSource::Remote(url), Some(remote)) => fetch::get(&url, remote).await?,
            (openai::ImageSource::Remote(_), None) => {
                return Err(ApiError::unsupported("image_url", "http(s) image URLs are not enabled"))
            }
            // `openai::parse` gives paths for videos only.
            (openai::ImageSource::Path(_), _) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "image given as a path"))
            }
        });
    }
    admission.reserve_pixels(openai::image_pixels(&image_bytes)?)?;
    // A video: fetched like an image; its frames are held resized to one tile each.
    let video = match video {
        None => None,
        Some(v) => {
            let source = match (v.source, &state.cfg.remote_media) {
                (openai::ImageSource::Remote(url), Some(remote)) => {
                    openai::ImageSource::Bytes(fetch::get(&url, remote).await?)
                }
                (openai::ImageSource::Remote(_), None) => {
                    return Err(ApiError::unsupported("video_url", "http(s) video URLs are not enabled"))
                }
                (other, _) => other,
            };
            let side = u64::from(model.manifest.image.image_size);
            admission.reserve_pixels(v.sampling.frames as u64 * side * side)?;
            Some((source, v.sampling))
        }
    };
    let worker = Arc::clone(&model);
    let seq = tokio::task::spawn_blocking(move || -> Result<Sequence, ApiError> {
        if let Some((source, sampling)) = video {
            openai::decode_video(&mut content, source, &sampling, worker.manifest.image.image_size)?;
        }
        openai::decode_images(&mut content, image_bytes)?;
        let request = worker.prepare(content, params).map_err(|e| ApiError::from_library(&e))?;
        Ok(Sequence::new(&worker, request, Box::new(ChannelSink(tx))))
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "request preparation failed"))??;
    {
        let submit = state.submit.lock().unwrap_or_else(|p| p.into_inner());
        let sent = submit.as_ref().map(|s| s.send(seq).is_ok()).unwrap_or(false);
        if !sent {
            return Err(ApiError::unavailable("the engine is not running"));
        }
    }
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let reply =
        Reply { id, created, model: model.name().to_string(), tokens_per_tile: model.manifest.vision.tokens_per_tile };
    if stream {
        Ok(stream_response(reply, rx, include_usage, admission, state.cfg.keep_alive))
    } else {
        complete(reply, rx, admission).await
    }
}

async fn complete(
    reply: Reply,
    mut rx: tmpsc::UnboundedReceiver<Event>,
    admission: Admission,
) -> Result<Response, ApiError> {
    let _admission = admission;
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(_) => {}
            Event::Error(e) => return Err(ApiError::from_library(&e)),
            Event::Done(out) => return Ok(Json(reply.completion(&out)).into_response()),
        }
    }
    Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the request ended without an answer"))
}

fn stream_response(
    reply: Reply,
    mut rx: tmpsc::UnboundedReceiver<Event>,
    include_usage: bool,
    admission: Admission,
    keep_alive: u64,
) -> Response {
    let (tx, sse) = tmpsc::channel::<Result<SseEvent, std::convert::Infallible>>(64);
    // Forwards the engine's events as SSE; when the client goes away the SSE receiver is dropped, this task
    // ends and drops the engine's receiver: the engine sees the sequence's sink closed and cancels it.
    tokio::spawn(async move {
        let _admission = admission;
        let first = Delta { role: Some("assistant"), content: Some(String::new()) };
        if tx.send(Ok(json_event(&reply.chunk(first, None)))).await.is_err() {
            return;
        }
        loop {
            let event = tokio::select! {
                event = rx.recv() => event,
                () = tx.closed() => return,
            };
            let Some(event) = event else { return };
            let (events, last) = match event {
                Event::Text(piece) => {
                    let delta = Delta { content: Some(piece), ..Delta::default() };
                    (vec![json_event(&reply.chunk(delta, None))], false)
                }
                Event::Error(e) => {
                    (vec![json_event(&ApiError::from_library(&e).body()), SseEvent::default().data("[DONE]")], true)
                }
                Event::Done(out) => {
                    let finish = Some(types::finish_reason(out.finish_reason));
                    let mut v = vec![json_event(&reply.chunk(Delta::default(), finish))];
                    if include_usage {
                        v.push(json_event(&reply.usage_chunk(&out)));
                    }
                    v.push(SseEvent::default().data("[DONE]"));
                    (v, true)
                }
            };
            for e in events {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            if last {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(sse);
    let sse =
        Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(keep_alive.max(1))).text("ping"));
    let mut response = sse.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    response
}

fn json_event(v: &impl serde::Serialize) -> SseEvent {
    // Serialising these plain structs cannot fail; an empty object would be the fallback.
    SseEvent::default().data(serde_json::to_string(v).unwrap_or_else(|_| "{}".into()))
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorized(&state, &headers) {
        return e.into_response();
    }
    let model = match state.model() {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let card = ModelCard {
        id: model.name(),
        object: "model",
        created,
        owned_by: "internvl",
        context_length: model.manifest.decoder.max_context,
    };
    Json(ModelList { object: "list", data: [card] }).into_response()
}

/// Readiness: loaded, not draining, room in the queue, and the engine thread alive.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    // Not an error response (probes must not count as failed requests), but the same envelope.
    let unavailable = |why: &str| {
        let body = json!({"status": why, "error": {"code": 503, "message": why, "type": "unavailable_error"}});
        (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(body)).into_response()
    };
    if state.model.get().is_none() {
        return unavailable("loading model");
    }
    if state.draining.load(Ordering::Relaxed) {
        return unavailable("shutting down");
    }
    if !state.engine_alive() {
        return unavailable("engine not responding");
    }
    if state.in_flight.load(Ordering::Relaxed) >= state.cfg.parallel + state.cfg.queue {
        return unavailable("queue full");
    }
    Json(json!({"status": "ok"})).into_response()
}

/// Liveness: the process answers and the engine thread goes round its loop (true while loading too).
async fn live(State(state): State<Arc<AppState>>) -> Response {
    if state.engine_alive() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "engine not responding"}))).into_response()
    }
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    metrics::gauge!("internvl_resident_memory_bytes").set(rss_bytes() as f64);
    metrics::gauge!("internvl_requests_admitted").set(state.in_flight.load(Ordering::Relaxed) as f64);
    if let Some(model) = state.model.get() {
        let cache = model.media_cache();
        metrics::gauge!("internvl_vision_cache_bytes").set(cache.bytes() as f64);
        metrics::gauge!("internvl_vision_cache_entries").set(cache.len() as f64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.prometheus.render()).into_response()
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_compare_equal_only_when_equal() {
        use super::constant_time_eq as eq;
        assert!(eq(b"secret", b"secret"));
        assert!(!eq(b"secreT", b"secret") && !eq(b"secre", b"secret") && !eq(b"secrets", b"secret") && !eq(b"", b"x"));
        assert!(eq(b"", b""));
    }
}
