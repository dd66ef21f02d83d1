//! One request in an engine: where it stands ([`Phase`], ending in one `Done(End)`), its images'
//! encoding progress, its KV-cache row, the sampler and the answer stream. Its transitions are methods;
//! the engine decides when each happens.

use std::sync::Arc;
use std::time::Instant;

use ::image::RgbImage;
use anyhow::Result;

use super::output::{Event, Sink};
use crate::media::image::ImageConfig;
use crate::media::{EncodedImage, Media, MediaKey};
use crate::model::{ImageRows, ImageSource, Model, Params, Prepared};
use crate::sampling::Sampler;
use crate::text::stop::StopFilter;
use crate::text::tokenizer::AnswerStream;

/// How a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// An end-of-turn (end-of-sequence) token was sampled.
    Eos,
    /// A stop string appeared (the text is cut before it).
    StopString,
    /// Its budget (`max_new_tokens`, or the context) is spent.
    Length,
    /// Failed; its error was sent.
    Failed,
    /// Its listener went away.
    Cancelled,
}

impl End {
    /// Whether the sequence ends without an output (its error was sent, or nobody listens).
    pub fn silent(self) -> bool {
        matches!(self, End::Failed | End::Cancelled)
    }
}

pub(crate) enum Phase {
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
    Done(End),
}

/// One image's encoding progress.
pub(crate) struct MediaState {
    pub key: MediaKey,
    pub tiles: usize,
    /// The decoded image, until the vision worker has tiled it (a queued request holds only this: 3
    /// bytes a pixel, not the tiles' 48 floats).
    pub image: Option<Arc<RgbImage>>,
    /// Normalised tiles (`[tiles, 3, size, size]`) while they are being encoded; shared with the vision
    /// worker.
    pub pixels: Arc<Vec<f32>>,
    /// A batch of its tiles is with the vision worker.
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

impl MediaState {
    fn new(p: crate::model::PreparedImage) -> Self {
        let (image, features, original, done) = match p.source {
            ImageSource::Pixels(image) => (Some(image), None, None, 0),
            ImageSource::Encoded { features, original } => (None, Some(features), Some(original), p.tiles),
        };
        Self {
            key: p.key,
            tiles: p.tiles,
            image,
            pixels: Arc::new(Vec::new()),
            in_flight: false,
            done,
            rows: Vec::new(),
            features,
            first: p.first,
            original,
        }
    }

    /// Still needs tiles encoded.
    pub fn pending(&self) -> bool {
        self.features.is_none() && self.done < self.tiles
    }

    /// Drops what encoding would need: the image lies wholly in a prefix the cache already holds.
    pub fn skip(&mut self) {
        self.pixels = Arc::new(Vec::new());
        self.image = None;
        self.done = self.tiles;
    }

    /// Adds a batch's rows; when the image is complete, returns its features (to cache).
    pub fn add_rows(&mut self, rows: Vec<f32>, tiles: usize) -> Option<Arc<EncodedImage>> {
        if self.rows.is_empty() {
            self.rows = rows;
        } else {
            self.rows.extend_from_slice(&rows);
        }
        self.done += tiles;
        if self.done < self.tiles {
            return None;
        }
        let features = Arc::new(EncodedImage { tiles: self.tiles, rows: std::mem::take(&mut self.rows) });
        self.pixels = Arc::new(Vec::new());
        self.features = Some(Arc::clone(&features));
        Some(features)
    }
}

/// Where a sequence's time went.
#[derive(Default)]
pub(crate) struct Clock {
    pub preprocess_ms: f64,
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub first_token_ms: f64,
    pub decode_started: Option<Instant>,
    pub decode_steps: usize,
    pub last_token: Option<Instant>,
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
    pub(crate) phase: Phase,
    pub(crate) row: usize,
    /// Prompt positions already in the row's cache when it was admitted.
    pub(crate) keep: usize,
    pub(crate) sink: Box<dyn Sink>,
    sampler: Sampler,
    pub(crate) answer: AnswerStream,
    pub(crate) stops: StopFilter,
    pub(crate) generated: Vec<u32>,
    pub(crate) forced_logits: Vec<Vec<f32>>,
    /// Engine step at which it last got prefill work (round robin).
    pub(crate) served: u64,
    pub(crate) started: Instant,
    pub(crate) clock: Clock,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Sequence {
    /// A prepared request ([`Model::prepare`]) whose events go to `sink`.
    pub fn new(model: &Model, request: Prepared, sink: Box<dyn Sink>) -> Self {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let Prepared { params, ids, budget, images, image_cfg, started } = request;
        Self {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            prompt_len: ids.len(),
            ids,
            budget,
            media: images.into_iter().map(MediaState::new).collect(),
            image_cfg,
            phase: Phase::Queued,
            row: 0,
            keep: 0,
            sink,
            sampler: Sampler::new(params.sampling.clone()),
            answer: AnswerStream::new(model.manifest.tokenizer.answer.split_at.as_deref()),
            stops: StopFilter::new(&params.stop),
            params,
            generated: Vec::new(),
            forced_logits: Vec::new(),
            served: 0,
            clock: Clock { preprocess_ms: ms(started), ..Clock::default() },
            started,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_len
    }

    pub fn tiles(&self) -> usize {
        self.media.iter().map(|m| m.tiles).sum()
    }

    pub(crate) fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done(_))
    }

    pub(crate) fn end(&mut self, end: End) {
        self.phase = Phase::Done(end);
    }

    /// Sends `e` to the listener and ends the sequence.
    pub(crate) fn fail(&mut self, e: anyhow::Error) {
        metrics::counter!("internvl_requests_failed_total").increment(1);
        let _ = self.sink.send(Event::Error(e));
        self.end(End::Failed);
    }

    /// Ends the sequence if its listener went away.
    pub(crate) fn cancel_if_closed(&mut self) {
        if !self.is_done() && self.sink.is_closed() {
            metrics::counter!("internvl_requests_cancelled_total").increment(1);
            self.end(End::Cancelled);
        }
    }

    /// Its images as the prompt-embedding assembly needs them.
    pub(crate) fn image_rows(&self) -> Vec<ImageRows<'_>> {
        self.media
            .iter()
            .map(|m| ImageRows { first: m.first, tiles: m.tiles, features: m.features.as_deref() })
            .collect()
    }

    /// Picks the next id from `logits` and moves on: done, or that id to run.
    pub(crate) fn sample(&mut self, model: &Model, logits: &mut [f32]) {
        let id = match &self.params.forced {
            Some(ids) => {
                if self.params.keep_logits {
                    self.forced_logits.push(logits.to_vec());
                }
                ids[self.generated.len()]
            }
            // Rows past the tokenizer's ids (a vocabulary padded beyond it, as Qwen2.5's 151936 rows over
            // 151665 ids) name no token: never pick one (vLLM slices them off too); decoding one would fail
            // the request.
            None => {
                let ids = model.manifest.tokenizer.vocab_size.min(logits.len());
                self.sampler.next(&mut logits[..ids], &self.ids)
            }
        };
        self.phase = self.accept(model, id);
    }

    /// The phase after generating `id`: the answer text it completes is sent on the way.
    fn accept(&mut self, model: &Model, id: u32) -> Phase {
        if self.generated.is_empty() {
            self.clock.first_token_ms = ms(self.started);
            self.clock.decode_started = Some(Instant::now());
            self.clock.last_token = self.clock.decode_started;
            metrics::histogram!("internvl_time_to_first_token_seconds").record(self.clock.first_token_ms / 1e3);
        }
        let stop_ids = &model.manifest.tokenizer.stop_ids;
        if !self.params.ignore_eos && self.params.forced.is_none() && stop_ids.contains(&id) {
            return Phase::Done(End::Eos);
        }
        self.generated.push(id);
        self.ids.push(id);
        metrics::counter!("internvl_generated_tokens_total").increment(1);
        let piece = match self.answer.push(&model.tokenizer, id) {
            Ok(p) => p,
            Err(e) => {
                let _ = self.sink.send(Event::Error(e));
                return Phase::Done(End::Failed);
            }
        };
        if let Some(piece) = piece {
            let (shown, hit) = self.stops.push(&piece);
            if let Some(shown) = shown {
                if !self.sink.send(Event::Text(shown)) {
                    metrics::counter!("internvl_requests_cancelled_total").increment(1);
                    return Phase::Done(End::Cancelled);
                }
            }
            if hit {
                return Phase::Done(End::StopString);
            }
        }
        // The last id is not run: the next turn re-tokenises the answer anyway.
        if self.generated.len() >= self.budget {
            Phase::Done(End::Length)
        } else {
            Phase::Decode { next: id }
        }
    }

    /// Notes a decode step's time (inter-token latency).
    pub(crate) fn stepped(&mut self) {
        self.clock.decode_steps += 1;
        let now = Instant::now();
        if let Some(last) = self.clock.last_token {
            metrics::histogram!("internvl_inter_token_latency_seconds").record((now - last).as_secs_f64());
        }
        self.clock.last_token = Some(now);
    }

    /// Sends the text still held back (the tokenizer's tail, the stop filter's), returning the answer and
    /// how it ended: a stop string may still appear in that tail.
    pub(crate) fn flush(&mut self, model: &Model, end: End) -> Result<(String, End)> {
        let (rest, mut text) = self.answer.finish(&model.tokenizer)?;
        let mut end = end;
        if end != End::StopString {
            if let Some(rest) = rest {
                let (shown, hit) = self.stops.push(&rest);
                if let Some(shown) = shown {
                    self.sink.send(Event::Text(shown));
                }
                if hit {
                    end = End::StopString;
                }
            }
            if end != End::StopString {
                if let Some(shown) = self.stops.finish() {
                    self.sink.send(Event::Text(shown));
                }
            }
        }
        if end == End::StopString {
            let split_at = model.manifest.tokenizer.answer.split_at.as_deref();
            text = crate::text::tokenizer::answer_text(self.stops.text(), split_at);
        }
        Ok((text, end))
    }
}
