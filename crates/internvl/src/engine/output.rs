//! What a sequence reports: text as it comes ([`Event`]) to a [`Sink`], then its [`Output`].

use std::sync::Arc;

use anyhow::Result;
use serde::Serialize;

use super::sequence::{End, Sequence};
use crate::media::Media;
use crate::model::Model;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_new_tokens`, or the context is full.
    Length,
    /// The caller went away.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub load_ms: f64,
    pub preprocess_ms: f64,
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub first_token_ms: f64,
    pub decode_ms: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Output {
    /// The answer as the reference returns it (stripped; cut before a stop string).
    pub text: String,
    pub token_ids: Vec<u32>,
    /// The whole prompt, image tokens included.
    pub prompt_tokens: usize,
    /// Of those, the positions whose keys and values were already in the cache (an earlier turn's).
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    /// Tiles of all the request's images (each is `tokens_per_tile` prompt tokens).
    pub tiles: usize,
    pub finish_reason: FinishReason,
    pub timings: Timings,
    /// With `Params::forced`: the logits before each forced id (`[ids, vocab]`).
    #[serde(skip)]
    pub logits: Vec<Vec<f32>>,
    /// The request's images with their features where they were encoded (a conversation's next turn
    /// passes them back instead of the pixels).
    #[serde(skip)]
    pub media: Vec<Media>,
}

/// What a sequence reports as it goes.
#[derive(Debug)]
pub enum Event {
    /// New answer text, complete UTF-8.
    Text(String),
    Done(Box<Output>),
    Error(anyhow::Error),
}

/// Where a sequence's events go. `send` returning false, or `is_closed`, means nobody listens any more:
/// the engine cancels the sequence at whatever stage it is in.
pub trait Sink: Send {
    fn send(&mut self, event: Event) -> bool;
    fn is_closed(&self) -> bool {
        false
    }
}

impl Sink for std::sync::mpsc::Sender<Event> {
    fn send(&mut self, event: Event) -> bool {
        std::sync::mpsc::Sender::send(self, event).is_ok()
    }
}

impl Sequence {
    /// The output of a finished sequence (`end` not silent), after the last of its text was sent.
    pub(crate) fn output(&mut self, model: &Model, end: End) -> Result<Output> {
        let (text, end) = self.flush(model, end)?;
        let clock = &self.clock;
        let decode_ms = clock.decode_started.map_or(0.0, ms);
        let prefilled = self.prompt_len - self.keep;
        metrics::histogram!("internvl_e2e_request_latency_seconds").record(ms(self.started) / 1e3);
        let finish_reason = match end {
            End::Eos | End::StopString => FinishReason::Stop,
            End::Length | End::Failed => FinishReason::Length,
            End::Cancelled => FinishReason::Cancelled,
        };
        let timings = Timings {
            load_ms: model.load_ms,
            preprocess_ms: clock.preprocess_ms,
            vision_ms: clock.vision_ms,
            prefill_ms: clock.prefill_ms,
            first_token_ms: clock.first_token_ms,
            decode_ms,
            prefill_tokens_per_s: prefilled as f64 / (clock.prefill_ms / 1e3),
            decode_tokens_per_s: clock.decode_steps as f64 / (decode_ms / 1e3),
        };
        Ok(Output {
            text,
            prompt_tokens: self.prompt_len,
            cached_tokens: self.keep,
            generated_tokens: self.generated.len(),
            token_ids: std::mem::take(&mut self.generated),
            tiles: self.tiles(),
            finish_reason,
            logits: std::mem::take(&mut self.forced_logits),
            // (An image wholly inside a reused prefix has no features here and is left out: only a request
            // that is not a conversation's next turn has one.)
            media: self
                .media
                .iter()
                .filter_map(|m| match &m.features {
                    Some(features) => Some(Media::Encoded { key: m.key, features: Arc::clone(features) }),
                    None => m.original.clone(),
                })
                .collect(),
            timings,
        })
    }
}

fn ms(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
