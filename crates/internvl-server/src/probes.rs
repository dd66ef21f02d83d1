//! The routes around the API: `/v1/models`, readiness (`/health`, `/health/ready`), liveness
//! (`/health/live`) and Prometheus `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::authorized;
use crate::state::AppState;
use crate::types::{ModelCard, ModelList};

pub(crate) async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
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
pub(crate) async fn health(State(state): State<Arc<AppState>>) -> Response {
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
pub(crate) async fn live(State(state): State<Arc<AppState>>) -> Response {
    if state.engine_alive() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "engine not responding"}))).into_response()
    }
}

pub(crate) async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
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
