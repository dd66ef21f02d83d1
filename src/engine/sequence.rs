//! One request's state: what it asks (content), how to answer (parameters), and where it stands: its
//! images' features, its prompt ids, its KV-cache row, the sampler and the answer stream.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use image::RgbImage;

use super::media::{EncodedImage, Media, MediaKey};
use crate::image::ImageConfig;
use crate::prompt::Turn;
use crate::sampling::{Sampler, SamplingOptions};
use crate::tokenizer::AnswerStream;

/// What a request asks: a question after earlier turns, with the conversation's images in order (the
/// `<image>` placeholders of the turns, or, where there are none, before the question as `chat()` puts
/// them).
#[derive(Debug, Clone, Default)]
pub struct Content {
    /// None: the template's system message; Some(""): no system block.
    pub system: Option<String>,
    /// Earlier turns of the conversation, oldest first.
    pub history: Vec<Turn>,
    pub question: String,
    pub images: Vec<Media>,
}

/// How to answer.
#[derive(Debug, Clone)]
pub struct Params {
    pub max_new_tokens: usize,
    pub sampling: SamplingOptions,
    /// Tiles per image at most; None: the manifest's (12).
    pub max_tiles: Option<u32>,
    /// The answer ends before the first of these strings (not included).
    pub stop: Vec<String>,
    /// Keep decoding past end-of-turn tokens (benchmarks measure a fixed number of steps).
    pub ignore_eos: bool,
    /// Teacher forcing: answer with exactly these ids instead of sampling (stop tokens included): how
    /// `scripts/quality.py` scores a model.
    pub forced: Option<Vec<u32>>,
    /// With `forced`: return the logits each forced id follows (`Output::logits`, vocab floats per id).
    pub keep_logits: bool,
}

impl Params {
    pub fn new(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            sampling: SamplingOptions::default(),
            max_tiles: None,
            stop: Vec::new(),
            ignore_eos: false,
            forced: None,
            keep_logits: false,
        }
    }
}

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

pub(crate) struct MediaState {
    pub key: MediaKey,
    pub tiles: usize,
    /// The decoded image, until the vision thread has tiled it (a queued request holds only this: 3 bytes
    /// a pixel, not the tiles' 48 floats).
    pub image: Option<Arc<RgbImage>>,
    /// Normalised tiles (`[tiles, 3, size, size]`) while they are being encoded; shared with the vision
    /// thread.
    pub pixels: Arc<Vec<f32>>,
    /// A batch of its tiles is with the vision thread.
    pub in_flight: bool,
    /// Tiles encoded so far, and their rows.
    pub done: usize,
    pub rows: Vec<f32>,
    pub features: Option<Arc<EncodedImage>>,
    /// Index in the prompt ids of this image's first `<IMG_CONTEXT>`.
    pub first: usize,
    /// The request's media as given, where it came encoded (an earlier turn's).
    pub original: Option<Media>,
}

pub(crate) enum Stage {
    /// Not yet given a row.
    Queued,
    /// Images being encoded, a batch of tiles per engine step.
    Vision,
    /// Prompt positions from `keep` on being run, a chunk per engine step: `embeds` are theirs, `done`
    /// of them ran.
    Prefill {
        embeds: Vec<f32>,
        done: usize,
    },
    /// `next` was sampled and is to run through the decoder with the other decoding sequences.
    Decode {
        next: u32,
    },
    Finished,
}

pub struct Sequence {
    pub(crate) id: u64,
    pub(crate) params: Params,
    /// Prompt ids, then every generated id.
    pub(crate) ids: Vec<u32>,
    pub(crate) prompt_len: usize,
    /// Most ids to generate (the context bounds it too).
    pub(crate) budget: usize,
    pub(crate) media: Vec<MediaState>,
    /// How its images are tiled.
    pub(crate) image_cfg: ImageConfig,
    pub(crate) stage: Stage,
    pub(crate) row: usize,
    /// Prompt positions already in the row's cache when it was admitted.
    pub(crate) keep: usize,
    pub(crate) sink: Box<dyn Sink>,
    pub(crate) sampler: Sampler,
    pub(crate) answer: AnswerStream,
    pub(crate) stops: StopFilter,
    pub(crate) generated: Vec<u32>,
    pub(crate) forced_logits: Vec<Vec<f32>>,
    /// Engine step at which it last got prefill or vision work (round robin).
    pub(crate) served: u64,
    pub(crate) started: Instant,
    pub(crate) preprocess_ms: f64,
    pub(crate) vision_ms: f64,
    pub(crate) prefill_ms: f64,
    pub(crate) first_token_ms: f64,
    pub(crate) decode_started: Option<Instant>,
    pub(crate) decode_steps: usize,
    pub(crate) last_token: Option<Instant>,
    /// Ended by an end-of-turn token.
    pub(crate) stop_token: bool,
    /// Ended by a stop string (the text is cut before it).
    pub(crate) stop_string: bool,
    /// Failed (its error was sent) or cancelled: no output to send.
    pub(crate) silent: bool,
}

impl Sequence {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_len
    }

    pub fn tiles(&self) -> usize {
        self.media.iter().map(|m| m.tiles).sum()
    }
}

/// Holds back answer text that could be the start of a stop string, and cuts the answer where one
/// appears.
#[derive(Default)]
pub(crate) struct StopFilter {
    stops: Vec<String>,
    text: String,
    shown: usize,
}

impl StopFilter {
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), text: String::new(), shown: 0 }
    }

    /// Adds answer text; returns what can be shown now and whether a stop string ended the answer.
    pub fn push(&mut self, piece: &str) -> (Option<String>, bool) {
        self.text.push_str(piece);
        if self.stops.is_empty() {
            return (self.take(self.text.len()), false);
        }
        let hit = self.stops.iter().filter_map(|s| self.text[self.shown..].find(s.as_str())).min();
        if let Some(at) = hit {
            let end = self.shown + at;
            let piece = self.take(end);
            self.text.truncate(end);
            return (piece, true);
        }
        // The longest tail that begins some stop string stays back.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.text.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let end = (self.text.len() - keep).max(self.shown);
        (self.take(end), false)
    }

    /// Everything not shown yet (the answer ended without a stop string).
    pub fn finish(&mut self) -> Option<String> {
        self.take(self.text.len())
    }

    /// The answer so far (cut at a stop string once one appeared).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take(&mut self, end: usize) -> Option<String> {
        if end <= self.shown {
            return None;
        }
        let piece = self.text[self.shown..end].to_string();
        self.shown = end;
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut f = StopFilter::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut shown = String::new();
        for p in pieces {
            let (piece, hit) = f.push(p);
            shown.extend(piece);
            if hit {
                assert_eq!(shown, f.text());
                return (shown, true);
            }
        }
        shown.extend(f.finish());
        (shown, false)
    }

    #[test]
    fn stop_strings_cut_the_answer_even_across_pieces() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["END"], &["hello E", "N", "D more"]), ("hello ".into(), true));
        assert_eq!(run(&["END"], &["hello EN", "d"]), ("hello ENd".into(), false));
        assert_eq!(run(&["\n\n", "x"], &["one\n", "\ntwo"]), ("one".into(), true));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
        assert_eq!(run(&["stop"], &["stop"]), ("".into(), true));
    }
}
