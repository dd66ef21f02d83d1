//! `POST /v1/chat/completions`: auth, parsing, admission, media, preparation off the async runtime, then
//! the answer as one body or as SSE chunks. A client that goes away drops its receiver, and the engine
//! cancels the sequence at its next step.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use internvl::engine::{Event, Sequence};
use internvl::media::video::FrameSampling;
use internvl::model::Model;
use serde_json::Value;
use tokio::sync::mpsc as tmpsc;

use internvl::cancel::{Cancel, CancelOnDrop};

use crate::admission::Admission;
use crate::auth::authorized;
use crate::engine_thread::ChannelSink;
use crate::error::ApiError;
use crate::state::AppState;
use crate::types::{self, Delta, Reply};
use crate::{fetch, openai};

pub(crate) async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    metrics::counter!("internvl_http_requests_total", "route" => "chat_completions").increment(1);
    match chat(state, headers, body).await {
        Ok(r) => r,
        Err(e) => {
            let mut r = e.into_response();
            if matches!(
                r.status(),
                StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNAUTHORIZED | StatusCode::REQUEST_TIMEOUT
            ) {
                // The unread rest of the body is still on the connection, which the server then drops:
                // saying so keeps a client from sending its next request on it.
                r.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
            }
            r
        }
    }
}

async fn chat(state: Arc<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    // Who asks and how much they send are checked from the headers, before a byte of the body is read.
    authorized(&state, &headers)?;
    let model = Arc::clone(state.model()?);
    let body = read_body(body, &headers, state.cfg.body_limit, state.cfg.timeouts.body).await?;
    let body: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    check_model(&body, model.name())?;
    let ctx = model.manifest.decoder.max_context;
    let policy =
        openai::MediaPolicy { media_root: state.media_root.as_deref(), remote: state.cfg.remote_media.is_some() };
    let req = openai::parse(&body, &policy, model.manifest.generation.max_new_tokens, ctx)?;

    // Admission: running + waiting bounded; the rest are told to come back.
    let admission = Arc::new(Admission::enter(&state)?);
    // However this handler ends (its client gone included), the work it started stops at its next check;
    // what that work holds stays admitted until it has really stopped (the worker keeps an Arc of it).
    let cancel = Cancel::new();
    let _stop_work = CancelOnDrop(cancel.clone());

    let (tx, rx) = tmpsc::unbounded_channel();
    let openai::ChatRequest { mut content, params, stream, include_usage, images, video } = req;
    let (image_bytes, video) = gather_media(&state, &model, &admission, images, video).await?;
    // `held` moves into the work: the request stays admitted until the work has stopped, even when its
    // client has gone and this handler with it.
    let (worker, held, root) = (Arc::clone(&model), Arc::clone(&admission), state.media_root.clone());
    let seq = tokio::task::spawn_blocking(move || -> Result<Sequence, ApiError> {
        if let Some((source, sampling)) = video {
            let size = worker.manifest.image.image_size;
            openai::decode_video(&mut content, source, &sampling, size, &cancel, root.as_deref(), &held)?;
        }
        openai::decode_images(&mut content, image_bytes, &cancel)?;
        cancel.check().map_err(|e| ApiError::from_library(&e))?;
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
        let (keep_alive, send_timeout) = (state.cfg.keep_alive, state.cfg.timeouts.send);
        Ok(stream_response(reply, rx, include_usage, admission, keep_alive, send_timeout))
    } else {
        complete(reply, rx, admission).await
    }
}

/// The `model` field, when given, must name the model served here.
fn check_model(body: &Value, served: &str) -> Result<(), ApiError> {
    let name = match body.get("model") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::String(name)) => name,
        Some(_) => return Err(ApiError::invalid("model must be a string").param("model")),
    };
    if name != served && !name.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("model {name:?} is not served here (this server serves {served:?})"),
        )
        .param("model")
        .code("model_not_found"));
    }
    Ok(())
}

type Gathered = (Vec<Vec<u8>>, Option<(openai::ImageSource, FrameSampling)>);

/// The request's images as bytes and its video's source, inside its admission: remote ones fetched (each
/// admitted before it is), the images' decoded pixels and the video's tiles admitted from their headers. A
/// client that goes away cancels the fetches with this future.
async fn gather_media(
    state: &AppState,
    model: &Model,
    admission: &Admission,
    images: Vec<openai::ImageSource>,
    video: Option<openai::VideoRequest>,
) -> Result<Gathered, ApiError> {
    let mut image_bytes = Vec::with_capacity(images.len());
    for source in images {
        image_bytes.push(match (source, &state.cfg.remote_media) {
            (openai::ImageSource::Bytes(b), _) => b,
            (openai::ImageSource::Remote(url), Some(remote)) => fetched(&url, remote, admission).await?,
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
    let Some(v) = video else { return Ok((image_bytes, None)) };
    let source = match (v.source, &state.cfg.remote_media) {
        (openai::ImageSource::Remote(url), Some(remote)) => {
            openai::ImageSource::Bytes(fetched(&url, remote, admission).await?)
        }
        (openai::ImageSource::Remote(_), None) => {
            return Err(ApiError::unsupported("video_url", "http(s) video URLs are not enabled"))
        }
        (other, _) => other,
    };
    // Its frames are held resized to one tile each.
    let side = u64::from(model.manifest.image.image_size);
    admission.reserve_pixels(v.sampling.frames as u64 * side * side)?;
    Ok((image_bytes, Some((source, v.sampling))))
}

/// A remote image or video, its bytes admitted (as pixels of 3 bytes) before it is fetched: the most a fetch
/// may bring first, then what it brought.
async fn fetched(url: &str, remote: &fetch::RemoteMedia, admission: &Admission) -> Result<Vec<u8>, ApiError> {
    let most = (remote.max_bytes as u64).div_ceil(3);
    admission.reserve_pixels(most)?;
    let bytes = fetch::get(url, remote).await?;
    admission.release_pixels(most - (bytes.len() as u64).div_ceil(3).min(most));
    Ok(bytes)
}

/// The request body, at most `limit` bytes: a `Content-Length` over it is refused before reading, a body
/// that grows past it (chunked, or a lying length) as soon as it does, and one not complete within `within`
/// (silent, or dripping a byte at a time) is answered 408.
async fn read_body(body: Body, headers: &HeaderMap, limit: usize, within: Duration) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is over the limit of {limit} bytes"),
        )
        .code("request_too_large")
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = body;
    let mut bytes = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                let secs = within.as_secs_f64();
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    format!("the request body did not arrive within {secs} s"),
                )
                .code("request_timeout"));
            }
            Ok(None) => return Ok(Bytes::from(bytes)),
            Ok(Some(frame)) => frame.map_err(|e| ApiError::invalid(format!("cannot read the request body: {e}")))?,
        };
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&data);
        }
    }
}

async fn complete(
    reply: Reply,
    mut rx: tmpsc::UnboundedReceiver<Event>,
    admission: Arc<Admission>,
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
    admission: Arc<Admission>,
    keep_alive: u64,
    send_timeout: Duration,
) -> Response {
    let (tx, sse) = tmpsc::channel::<Result<SseEvent, std::convert::Infallible>>(64);
    // A chunk the client does not take within `send_timeout` (it stopped reading: the channel and the
    // socket's buffers are full) ends the stream like a disconnect: the request is cancelled, its slot freed.
    let send = move |tx: &tmpsc::Sender<_>, e: SseEvent| {
        let tx = tx.clone();
        async move { matches!(tokio::time::timeout(send_timeout, tx.send(Ok(e))).await, Ok(Ok(()))) }
    };
    // Forwards the engine's events as SSE; when the client goes away the SSE receiver is dropped, this task
    // ends and drops the engine's receiver: the engine sees the sequence's sink closed and cancels it.
    tokio::spawn(async move {
        let _admission = admission;
        let first = Delta { role: Some("assistant"), content: Some(String::new()) };
        if !send(&tx, json_event(&reply.chunk(first, None))).await {
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
                if !send(&tx, e).await {
                    metrics::counter!("internvl_streams_cut_total").increment(1);
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
