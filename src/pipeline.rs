//! One request end to end: preprocess -> vision -> embed -> decode -> sample, streaming text.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Result};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::decoder::{Decoder, KvCache};
use crate::embed::Embeddings;
use crate::image::{preprocess, ImageConfig, MAX_TILES};
use crate::manifest::Manifest;
use crate::prompt;
use crate::runtime::RuntimeOptions;
use crate::sampling::{Sampler, SamplingOptions};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::vision::VisionEncoder;

/// A loaded model folder: the graphs, the tokenizer and the embedding table.
pub struct InternVL {
    pub manifest: Manifest,
    pub tokenizer: Tokenizer,
    embeddings: Embeddings,
    vision: VisionEncoder,
    decoder: Decoder,
    progress: bool,
    pub load_ms: f64,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub images: Vec<RgbImage>,
    pub prompt: String,
    /// Earlier turns of the conversation, oldest first.
    pub history: Vec<prompt::Turn>,
    /// None: the template's system message; Some(""): no system block.
    pub system: Option<String>,
    /// None: the manifest's default (12).
    pub max_tiles: Option<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingOptions,
    pub vision_batch: usize,
    pub prefill_chunk: usize,
    /// Keep decoding past end-of-turn tokens (benchmarks measure a fixed number of steps).
    pub ignore_stop: bool,
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
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub tiles: usize,
    /// "stop" (end-of-turn / eos token) or "length" (max new tokens or context full).
    pub finish_reason: &'static str,
    pub timings: Timings,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl InternVL {
    /// Loads and cross-checks a model folder (manifest, graphs, tokenizer, embedding table).
    pub fn load(dir: &Path, opts: &RuntimeOptions, progress: bool) -> Result<Self> {
        let t0 = Instant::now();
        let manifest = Manifest::load(dir)?;
        let bar = spinner(progress, "loading model");
        let tokenizer = Tokenizer::load(&manifest.path(&manifest.tokenizer.file))?;
        for (name, id) in [
            (&manifest.tokenizer.img_start, manifest.tokenizer.img_start_id),
            (&manifest.tokenizer.img_end, manifest.tokenizer.img_end_id),
            (&manifest.tokenizer.img_context, manifest.tokenizer.img_context_id),
        ] {
            ensure!(
                tokenizer.token_id(name) == Some(id),
                "{}: token {name} is not id {id} as the manifest says (tokenizer from another model?)",
                manifest.tokenizer.file
            );
        }
        let embeddings = Embeddings::open(&manifest)?;
        let vision = VisionEncoder::load(&manifest, opts)?;
        let decoder = Decoder::load(&manifest, opts)?;
        bar.finish_and_clear();
        Ok(Self { manifest, tokenizer, embeddings, vision, decoder, progress, load_ms: ms(t0) })
    }

    pub fn image_config(&self, max_tiles: Option<u32>) -> ImageConfig {
        ImageConfig { max_tiles: max_tiles.unwrap_or(self.manifest.image.max_tiles), ..self.manifest.image.clone() }
    }

    /// Image embeddings `[tiles, tokens_per_tile, hidden]` for normalised tiles `[tiles, 3, size, size]`.
    pub fn encode_tiles(&mut self, pixels: &[f32], tiles: usize, batch: usize) -> Result<Vec<f32>> {
        let bar = counter(self.progress && tiles > 1, tiles as u64, "vision tiles");
        let out = self.vision.encode(pixels, tiles, batch, &bar)?;
        bar.finish_and_clear();
        Ok(out)
    }

    /// Answers `req`, calling `on_text` with each new piece of text as soon as it is complete UTF-8.
    pub fn generate(&mut self, req: &Request, on_text: &mut dyn FnMut(&str) -> Result<()>) -> Result<Output> {
        let text =
            prompt::render(&self.manifest.template, &req.history, &req.prompt, req.system.as_deref(), req.images.len());
        let mut conv = self.new_conversation()?;
        self.turn(&mut conv, &text, &req.images, req, on_text)
    }

    /// The LLM stage on its own (benchmarks time decode steps at a chosen context).
    pub fn decoder_mut(&mut self) -> &mut Decoder {
        &mut self.decoder
    }

    pub fn new_conversation(&self) -> Result<Conversation> {
        Ok(Conversation { cache: self.decoder.empty_cache()?, pending: Vec::new(), turns: 0, broken: false })
    }

    /// The next turn of `conv`: `question` (with `<image>` placeholders for `images`, or none) after what
    /// the cache already holds; only the new tokens are run through the decoder.
    pub fn chat(
        &mut self,
        conv: &mut Conversation,
        question: &str,
        images: &[RgbImage],
        opts: &Request,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Output> {
        let t = &self.manifest.template;
        let text = if conv.turns == 0 {
            prompt::render(t, &[], question, opts.system.as_deref(), images.len())
        } else {
            prompt::continuation(t, question, images.len())
        };
        self.turn(conv, &text, images, opts, on_text)
    }

    fn turn(
        &mut self,
        conv: &mut Conversation,
        text: &str,
        images: &[RgbImage],
        req: &Request,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Output> {
        req.sampling.validate()?;
        if let Some(n) = req.max_tiles {
            ensure!((1..=MAX_TILES).contains(&n), "--max-tiles {n} must be between 1 and {MAX_TILES}");
        }
        let start = Instant::now();
        let hidden = self.manifest.decoder.hidden;

        // Preprocess.
        let cfg = self.image_config(req.max_tiles);
        let mut tiles: Vec<_> = images.iter().map(|img| preprocess(img, &cfg)).collect::<Result<_>>()?;
        let preprocess_ms = ms(start);

        // Prompt: tokens generated last turn but not yet run through the decoder come first.
        let counts: Vec<usize> = tiles.iter().map(|t| t.count).collect();
        ensure!(!conv.broken, "this conversation's cache was lost in an earlier error; start a new one");
        let first = conv.turns == 0;
        let mut ids = conv.pending.clone();
        ids.extend(prompt::token_ids(&self.manifest, &self.tokenizer, text, &counts, first)?);
        let ctx = self.manifest.decoder.max_context;
        let total = conv.cache.len + ids.len();
        ensure!(
            total < ctx,
            "the prompt is {total} tokens ({} tiles) but the model's context is {ctx} tokens; use fewer tiles (--max-tiles) or a shorter prompt",
            counts.iter().sum::<usize>()
        );

        // Vision: the tiles of all images, in order, batched together.
        let t = Instant::now();
        let total_tiles: usize = counts.iter().sum();
        let pixels: Vec<f32> = match tiles.len() {
            1 => std::mem::take(&mut tiles[0].data),
            _ => tiles.iter().flat_map(|t| t.data.iter().copied()).collect(),
        };
        drop(tiles);
        let image_embeds =
            if total_tiles > 0 { self.encode_tiles(&pixels, total_tiles, req.vision_batch)? } else { Vec::new() };
        drop(pixels);
        let vision_ms = ms(t);

        // Embed: text rows from the table, image rows from the vision graph at the <IMG_CONTEXT> positions.
        let t = Instant::now();
        let ctx_id = self.manifest.tokenizer.img_context_id;
        let mut embeds = Vec::with_capacity(ids.len() * hidden);
        let mut next_image_row = 0;
        let mut run_start = 0;
        for (i, &id) in ids.iter().enumerate() {
            if id == ctx_id {
                self.embeddings.lookup_into(&ids[run_start..i], &mut embeds)?;
                run_start = i + 1;
                embeds.extend_from_slice(&image_embeds[next_image_row * hidden..(next_image_row + 1) * hidden]);
                next_image_row += 1;
            }
        }
        self.embeddings.lookup_into(&ids[run_start..], &mut embeds)?;
        ensure!(next_image_row * hidden == image_embeds.len(), "image token count does not match the vision output");

        // Prefill. From here on the cache changes: a failure leaves the conversation unusable.
        conv.pending.clear();
        conv.broken = true;
        let budget = req.max_new_tokens.min(ctx - total);
        self.decoder.reserve(&mut conv.cache, total + budget)?;
        let bar = counter(self.progress, ids.len() as u64, "prefill tokens");
        let mut logits = self.decoder.forward(&embeds, &mut conv.cache, req.prefill_chunk, |n| bar.inc(n as u64))?;
        bar.finish_and_clear();
        let prefill_ms = ms(t);

        // Decode.
        let t = Instant::now();
        let mut sampler = Sampler::new(req.sampling.clone());
        let mut context = ids.clone();
        let mut generated = Vec::new();
        let mut stream = StreamDecoder::default();
        let mut started = false;
        let mut first_token_ms = 0.0;
        let mut finish_reason = "length";
        let mut steps = 0usize;
        while generated.len() < budget {
            let id = sampler.next(&mut logits, &context);
            if generated.is_empty() {
                first_token_ms = ms(start);
            }
            if !req.ignore_stop && self.manifest.tokenizer.stop_ids.contains(&id) {
                finish_reason = "stop";
                break;
            }
            generated.push(id);
            context.push(id);
            if let Some(piece) = stream.push(&self.tokenizer, id)? {
                emit(&piece, &mut started, on_text)?;
            }
            if generated.len() == budget {
                // Not run yet: the next turn feeds it first.
                conv.pending.push(id);
                break;
            }
            let mut row = Vec::with_capacity(hidden);
            self.embeddings.lookup_into(&[id], &mut row)?;
            logits = self.decoder.forward(&row, &mut conv.cache, 1, |_| ())?;
            steps += 1;
        }
        if let Some(piece) = stream.finish(&self.tokenizer)? {
            emit(&piece, &mut started, on_text)?;
        }
        conv.turns += 1;
        conv.broken = false;
        let decode_ms = ms(t);
        let text = self.tokenizer.decode(&generated)?.trim().to_string();
        Ok(Output {
            text,
            prompt_tokens: ids.len(),
            generated_tokens: generated.len(),
            token_ids: generated,
            tiles: total_tiles,
            finish_reason,
            timings: Timings {
                load_ms: self.load_ms,
                preprocess_ms,
                vision_ms,
                prefill_ms,
                first_token_ms,
                decode_ms,
                prefill_tokens_per_s: ids.len() as f64 / (prefill_ms / 1e3),
                decode_tokens_per_s: steps as f64 / (decode_ms / 1e3),
            },
        })
    }
}

/// A conversation kept between turns: the KV cache of everything said so far, so a new turn only runs
/// its own tokens through the decoder.
pub struct Conversation {
    cache: KvCache,
    /// Generated but not yet in the cache (the last token of an answer cut by the token budget).
    pending: Vec<u32>,
    turns: usize,
    /// A turn failed after touching the cache.
    broken: bool,
}

impl Conversation {
    /// A turn failed after touching the cache: only a new conversation can go on.
    pub fn is_broken(&self) -> bool {
        self.broken
    }
}

/// Streams text with the leading whitespace dropped, as the reference strips its answer.
fn emit(piece: &str, started: &mut bool, on_text: &mut dyn FnMut(&str) -> Result<()>) -> Result<()> {
    let piece = if *started { piece } else { piece.trim_start() };
    if !piece.is_empty() {
        *started = true;
        on_text(piece)?;
    }
    Ok(())
}

fn spinner(enabled: bool, msg: &'static str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner().with_message(msg);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn counter(enabled: bool, len: u64, msg: &'static str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template("{msg:>14} [{bar:30}] {pos}/{len} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    ProgressBar::new(len).with_style(style).with_message(msg)
}
