//! The OpenAI Chat Completions request, read into the engine's [`Content`] and [`Params`] (the response
//! bodies are in `types.rs`).

use std::path::Path;

use base64::Engine as _;
use serde_json::Value;

use crate::admission::Admission;
use crate::error::ApiError;
use internvl::cancel::Cancel;
use internvl::engine::{Content, Params};
use internvl::limits;
use internvl::media::video::FrameSampling;
use internvl::media::Media;
use internvl::sampling::{self, SamplingOptions};
use internvl::text::prompt::{self, Turn};

/// Where images may come from, as the server was started.
pub struct MediaPolicy<'a> {
    /// `file://` URLs only under this folder.
    pub media_root: Option<&'a Path>,
    /// http(s) URLs are fetched (see `fetch.rs`) only when the server allows it.
    pub remote: bool,
}

/// An image or video as the request gives it: its bytes, or a URL still to fetch; a video under the
/// media root as its path (read by FFmpeg there, not copied into memory).
pub enum ImageSource {
    Bytes(Vec<u8>),
    Remote(String),
    Path(std::path::PathBuf),
}

/// A `video_url` part: where the video is and which frames to take (`num_frames`, default 8; `start` /
/// `end` in seconds, the model card's `bound`: fields of the part's `video_url` object).
pub struct VideoRequest {
    pub source: ImageSource,
    pub sampling: FrameSampling,
}

/// A checked request: what to ask, how, and how to answer.
pub struct ChatRequest {
    pub content: Content,
    pub params: Params,
    pub stream: bool,
    pub include_usage: bool,
    /// Encoded images to fetch and decode, in order, before the content is complete.
    pub images: Vec<ImageSource>,
    /// The request's video (then it has no images): its frames are the content's images, one tile each.
    pub video: Option<VideoRequest>,
}

fn field<'a>(body: &'a Value, name: &str) -> Option<&'a Value> {
    body.get(name).filter(|v| !v.is_null())
}

fn uint(body: &Value, name: &'static str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
    match field(body, name) {
        None => Ok(None),
        Some(v) => {
            match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(ApiError::invalid(format!("{name} must be an integer between {min} and {max}, not {v}"))
                    .param(name)),
            }
        }
    }
}

fn float(body: &Value, name: &'static str) -> Result<Option<f32>, ApiError> {
    match field(body, name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(|x| Some(x as f32))
            .ok_or_else(|| ApiError::invalid(format!("{name} must be a number, not {v}")).param(name)),
    }
}

/// Reads a request body. Unknown fields are ignored; parameters this server cannot honour are a 400
/// naming them (never silently dropped).
pub fn parse(
    body: &Value,
    policy: &MediaPolicy,
    max_new_tokens: usize,
    max_tokens_limit: usize,
) -> Result<ChatRequest, ApiError> {
    if !body.is_object() {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    }
    if let Some(n) = uint(body, "n", 0, u64::MAX).unwrap_or(Some(2)) {
        if n != 1 {
            return Err(ApiError::unsupported("n", "only n = 1 is supported"));
        }
    }
    for name in ["tools", "functions", "tool_choice", "function_call", "audio", "prediction"] {
        if field(body, name).is_some() {
            return Err(ApiError::unsupported(name, "not supported by this server"));
        }
    }
    if field(body, "logprobs").is_some_and(|v| v != &Value::Bool(false)) || field(body, "top_logprobs").is_some() {
        return Err(ApiError::unsupported("logprobs", "log probabilities are not supported"));
    }
    if let Some(format) = field(body, "response_format") {
        if format.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::unsupported("response_format", "only {\"type\": \"text\"} is supported"));
        }
    }
    for name in ["frequency_penalty", "presence_penalty"] {
        if float(body, name)?.is_some_and(|x| x != 0.0) {
            return Err(ApiError::unsupported(name, "not supported (use repetition_penalty)"));
        }
    }
    let limit = max_tokens_limit as u64;
    let max_tokens = uint(body, "max_completion_tokens", 1, limit)?.or(uint(body, "max_tokens", 1, limit)?);
    let mut sampling = SamplingOptions::default();
    // Greedy unless asked: answers equal `internvl run` (and the reference `chat()` defaults).
    let checked = |name: &'static str, rule: fn(f32) -> anyhow::Result<()>| -> Result<Option<f32>, ApiError> {
        let v = float(body, name)?;
        if let Some(x) = v {
            rule(x).map_err(|e| ApiError::invalid(e.to_string()).param(name))?;
        }
        Ok(v)
    };
    if let Some(t) = checked("temperature", sampling::check_temperature)? {
        sampling.temperature = t;
    }
    if let Some(p) = checked("top_p", sampling::check_top_p)? {
        sampling.top_p = p;
    }
    if let Some(r) = checked("repetition_penalty", sampling::check_repetition_penalty)? {
        sampling.repetition_penalty = r;
    }
    if let Some(k) = uint(body, "top_k", 0, 1 << 20)? {
        sampling.top_k = k as usize;
    } else if field(body, "top_k").is_some_and(|v| v.as_i64() == Some(-1)) {
        sampling.top_k = 0;
    }
    if let Some(v) = field(body, "seed") {
        sampling.seed = v
            .as_u64()
            .or_else(|| v.as_i64().map(|s| s as u64))
            .ok_or_else(|| ApiError::invalid(format!("seed must be an integer, not {v}")).param("seed"))?;
    }
    sampling.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    let stop = match field(body, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 4 => {
            items.iter().map(|s| s.as_str().map(str::to_string)).collect::<Option<Vec<_>>>().ok_or_else(|| {
                ApiError::invalid("stop must be a string or a list of at most 4 strings").param("stop")
            })?
        }
        Some(_) => return Err(ApiError::invalid("stop must be a string or a list of at most 4 strings").param("stop")),
    };
    let max_tiles = uint(body, "max_dynamic_patch", 1, u64::from(limits::MAX_TILES))?.map(|n| n as u32);
    let stream = match field(body, "stream") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| ApiError::invalid("stream must be a boolean").param("stream"))?,
    };
    let include_usage = match field(body, "stream_options") {
        None => false,
        Some(o) if o.is_object() => match field(o, "include_usage") {
            None => false,
            Some(v) => v.as_bool().ok_or_else(|| {
                ApiError::invalid("stream_options.include_usage must be a boolean").param("stream_options")
            })?,
        },
        Some(_) => return Err(ApiError::invalid("stream_options must be an object").param("stream_options")),
    };

    // vLLM's spelling: keep generating past end-of-turn tokens (benchmarks of a fixed length).
    let ignore_eos = match field(body, "ignore_eos") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| ApiError::invalid("ignore_eos must be a boolean").param("ignore_eos"))?,
    };
    let (content, images, video) = messages(body, policy)?;
    if video.is_some() && max_tiles.is_some() {
        return Err(ApiError::invalid("max_dynamic_patch does not apply to a video (one tile per frame)")
            .param("max_dynamic_patch"));
    }
    let max_tiles = if video.is_some() { Some(limits::VIDEO_TILES_PER_FRAME) } else { max_tiles };
    let max_new_tokens = max_tokens.map_or(max_new_tokens, |n| n as usize);
    let params = Params { sampling, max_tiles, stop, ignore_eos, ..Params::new(max_new_tokens) };
    Ok(ChatRequest { content, params, stream, include_usage, images, video })
}

/// The conversation: an optional system message, then user / assistant turns ending with a user one.
/// A user message's images go before its text as `chat()` places them (`<image>\n`, or `Image-1: ...`
/// lines for several), unless the text has its own `<image>` placeholders.
/// A message's video goes before its text as the model card asks (`Frame-N: <image>` lines); a request
/// has one video and then no images.
type Messages = (Content, Vec<ImageSource>, Option<VideoRequest>);

fn messages(body: &Value, policy: &MediaPolicy) -> Result<Messages, ApiError> {
    let list = field(body, "messages")
        .and_then(Value::as_array)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ApiError::invalid("messages must be a non-empty list").param("messages"))?;
    count_media(list)?;
    let mut system: Option<String> = None;
    let mut turns: Vec<Turn> = Vec::new();
    let mut pending_user: Option<String> = None;
    let mut images = Vec::new();
    let mut video: Option<VideoRequest> = None;
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => {
                let text = text_only(content, i)?;
                system = Some(match system {
                    Some(s) => format!("{s}\n{text}"),
                    None => text,
                });
            }
            "user" => {
                let (text, bytes, clip) = user_content(content, i, policy)?;
                let placed = match clip {
                    Some(clip) => {
                        if video.is_some() {
                            return Err(ApiError::invalid("a request may carry one video").param("video_url"));
                        }
                        let question = prompt::video_question(&text, clip.sampling.frames);
                        video = Some(clip);
                        question
                    }
                    None => prompt::place_images(&text, bytes.len()),
                };
                images.extend(bytes);
                pending_user = Some(match pending_user {
                    Some(earlier) => format!("{earlier}\n{placed}"),
                    None => placed,
                });
            }
            "assistant" => {
                let text = text_only(content, i)?;
                let user = pending_user.take().ok_or_else(|| {
                    ApiError::invalid(format!("messages[{i}]: an assistant message must follow a user message"))
                        .param("messages")
                })?;
                turns.push(Turn { user, assistant: text });
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "messages[{i}]: role {other:?} is not supported (system, user, assistant)"
                ))
                .param("messages"))
            }
        }
    }
    let question =
        pending_user.ok_or_else(|| ApiError::invalid("the last message must be a user message").param("messages"))?;
    if video.is_some() && !images.is_empty() {
        return Err(ApiError::invalid("a request with a video_url cannot also carry images").param("video_url"));
    }
    Ok((Content { system, history: turns, question, images: Vec::new() }, images, video))
}

/// Refuses more images or videos than a request may carry, counted over every message before any
/// `file://` is read or `data:` decoded (a 26 KB body can name hundreds of files).
fn count_media(messages: &[Value]) -> Result<(), ApiError> {
    let parts = messages.iter().filter_map(|m| m.get("content")?.as_array()).flatten();
    let (mut images, mut videos) = (0usize, 0usize);
    for p in parts {
        match p.get("type").and_then(Value::as_str) {
            Some("image_url") => images += 1,
            Some("video_url") => videos += 1,
            _ => {}
        }
    }
    limits::check_image_count(images).map_err(|e| ApiError::invalid(format!("{e:#}")).code("too_many_images"))?;
    if videos > 1 {
        return Err(ApiError::invalid("a request may carry one video").param("video_url"));
    }
    Ok(())
}

fn text_only(content: &Value, i: usize) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = Vec::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push(t),
                    _ => {
                        return Err(ApiError::invalid(format!("messages[{i}]: only text parts are allowed here"))
                            .param("messages"))
                    }
                }
            }
            Ok(text.join("\n"))
        }
        _ => {
            Err(ApiError::invalid(format!("messages[{i}].content must be a string or a list of parts"))
                .param("messages"))
        }
    }
}

type UserContent = (String, Vec<ImageSource>, Option<VideoRequest>);

fn user_content(content: &Value, i: usize, policy: &MediaPolicy) -> Result<UserContent, ApiError> {
    let Value::Array(parts) = content else { return Ok((text_only(content, i)?, Vec::new(), None)) };
    let (mut text, mut images, mut video) = (Vec::new(), Vec::new(), None);
    for p in parts {
        match p.get("type").and_then(Value::as_str) {
            Some("text") => text.push(p.get("text").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid(format!("messages[{i}]: a text part needs \"text\"")).param("messages")
            })?),
            Some("image_url") => {
                let url =
                    p.get("image_url").and_then(|u| u.get("url").or(Some(u))).and_then(Value::as_str).ok_or_else(
                        || ApiError::invalid(format!("messages[{i}]: image_url needs a url")).param("image_url"),
                    )?;
                images.push(fetch(url, policy, "image_url")?);
            }
            Some("video_url") => {
                let v = p.get("video_url").unwrap_or(&Value::Null);
                let url = v.get("url").or(Some(v)).and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid(format!("messages[{i}]: video_url needs a url")).param("video_url")
                })?;
                if video.is_some() {
                    return Err(ApiError::invalid("a request may carry one video").param("video_url"));
                }
                let frames = uint(v, "num_frames", 1, limits::MAX_FRAMES as u64)?
                    .map_or(internvl::media::video::DEFAULT_FRAMES, |n| n as usize);
                let bound = match (float(v, "start")?, float(v, "end")?) {
                    (Some(s), Some(e)) => Some((f64::from(s), f64::from(e))),
                    (None, None) => None,
                    _ => {
                        return Err(
                            ApiError::invalid("video_url: give both start and end, or neither").param("video_url")
                        )
                    }
                };
                let sampling = FrameSampling { frames, bound };
                sampling.validate().map_err(|e| ApiError::invalid(format!("video_url: {e}")).param("video_url"))?;
                video = Some(VideoRequest { source: fetch(url, policy, "video_url")?, sampling });
            }
            other => {
                return Err(ApiError::invalid(format!("messages[{i}]: content part type {other:?} is not supported"))
                    .param("messages"))
            }
        }
    }
    Ok((text.join("\n"), images, video))
}

/// An image or video URL's bytes: `data:` always, `file://` under the media root only, http(s) (fetched later)
/// only where the server allows it.
fn fetch(url: &str, policy: &MediaPolicy, what: &'static str) -> Result<ImageSource, ApiError> {
    let code = if what == "video_url" { "invalid_video" } else { "invalid_image" };
    let invalid = |m: String| ApiError::invalid(m).param(what).code(code);
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest.split_once(',').ok_or_else(|| invalid(format!("{what}: a data: URI needs a ','")))?;
        if !meta.ends_with(";base64") {
            return Err(invalid(format!("{what}: only base64 data: URIs are supported")));
        }
        return base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map(ImageSource::Bytes)
            .map_err(|e| invalid(format!("{what}: bad base64 ({e})")));
    }
    if let Some(path) = url.strip_prefix("file://") {
        let Some(root) = policy.media_root else {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "permission_error",
                format!("{what}: file:// URLs are not enabled (start the server with --media-root DIR)"),
            )
            .param(what));
        };
        let forbidden = || {
            ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "permission_error",
                format!("{what}: the file is not under the server's media root"),
            )
            .param(what)
        };
        let real = std::fs::canonicalize(path).map_err(|_| forbidden())?;
        if !real.starts_with(root) {
            return Err(forbidden());
        }
        if what == "video_url" {
            return Ok(ImageSource::Path(real));
        }
        return internvl::files::read_limited(&real, internvl::files::MAX_IMAGE_FILE, "image file")
            .map(ImageSource::Bytes)
            .map_err(|e| {
                invalid(format!(
                    "{what}: {}",
                    format!("{e:#}").replace(root.to_string_lossy().as_ref(), "<media-root>")
                ))
            });
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        if !policy.remote {
            return Err(ApiError::unsupported(
                what,
                "http(s) media URLs are not fetched by this server (start it with --allow-remote-media); send a data: URI",
            ));
        }
        return Ok(ImageSource::Remote(url.to_string()));
    }
    Err(invalid(format!("{what}: expected a data: URI")))
}

/// The pixels the images will take decoded, from their headers, checked against the per-request limits
/// (count, pixels: [`limits`]) before anything is decoded.
pub fn image_pixels(bytes: &[Vec<u8>]) -> Result<u64, ApiError> {
    let refused = |e: anyhow::Error| ApiError::invalid(format!("{e:#}"));
    limits::check_image_count(bytes.len()).map_err(|e| refused(e).code("too_many_images"))?;
    let mut pixels = 0u64;
    for (k, b) in bytes.iter().enumerate() {
        let (w, h) = internvl::media::image::dimensions_of(b).map_err(|e| {
            ApiError::invalid(format!("image {}: {e:#}", k + 1)).param("image_url").code("invalid_image")
        })?;
        pixels += u64::from(w) * u64::from(h);
    }
    limits::check_request_pixels(pixels).map_err(|e| refused(e).param("image_url").code("invalid_image"))?;
    Ok(pixels)
}

/// Decodes the images (checked by [`image_pixels`]) into the content.
pub fn decode_images(content: &mut Content, bytes: Vec<Vec<u8>>, cancel: &Cancel) -> Result<(), ApiError> {
    for (k, b) in bytes.into_iter().enumerate() {
        cancel.check().map_err(|e| ApiError::from_library(&e))?;
        let media = Media::decode(&b, false).map_err(|e| {
            ApiError::invalid(format!("image {}: {e:#}", k + 1)).param("image_url").code("invalid_image")
        })?;
        content.images.push(media);
    }
    Ok(())
}

/// Reads a video's sampled frames (FFmpeg runs here: call it off the async runtime) into the content.
pub(crate) fn decode_video(
    content: &mut Content,
    source: ImageSource,
    sampling: &FrameSampling,
    size: u32,
    cancel: &Cancel,
    media_root: Option<&Path>,
    admission: &Admission,
) -> Result<(), ApiError> {
    use internvl::media::video;
    let refused = |e: anyhow::Error| {
        let mut text = format!("{e:#}").replace('\n', " ");
        if let Some(root) = media_root {
            text = text.replace(root.to_string_lossy().as_ref(), "<media-root>");
        }
        match internvl::error::ErrorKind::of(&e) {
            internvl::error::ErrorKind::Internal => {
                ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "server_error", text)
            }
            _ => ApiError::invalid(text).param("video_url").code("invalid_video"),
        }
    };
    let opened = match source {
        ImageSource::Bytes(b) => video::open_bytes(&b),
        ImageSource::Path(p) => video::open(&p),
        ImageSource::Remote(_) => return Err(ApiError::invalid("video_url: not fetched").param("video_url")),
    }
    .map_err(refused)?;
    // What the decode holds (its frame at the video's own size), admitted once the header or ffprobe told
    // it and before a frame is decoded, and given back once the decode has ended (its tiles stay admitted);
    // the budget counts 3 bytes a pixel.
    let decoding = opened.decode_bytes().div_ceil(3);
    admission.reserve_pixels(decoding)?;
    let video = opened.decode(sampling, size, cancel);
    admission.release_pixels(decoding);
    let video = video.map_err(refused)?;
    content.images.extend(video.frames.into_iter().map(Media::frame));
    Ok(())
}
