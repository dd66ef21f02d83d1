//! One request end to end: preprocess -> vision -> embed -> decode -> sample, streaming text.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Result};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::decoder::{Decoder, KvCache};
use crate::embed::Embeddings;
use crate::error::{ErrorKind, WithKind};
use crate::image::{preprocess, tile_count, ImageConfig, MAX_TILES};
use crate::manifest::Manifest;
use crate::prompt;
use crate::runtime::RuntimeOptions;
use crate::sampling::{Sampler, SamplingOptions};
use crate::tokenizer::{AnswerStream, Tokenizer};
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
    /// Teacher forcing: answer with exactly these ids instead of sampling (stop tokens included): how
    /// `scripts/quality.py` scores a model.
    pub forced: Option<Vec<u32>>,
    /// With `forced`: return the logits each forced id follows (`Output::logits`, vocab floats per id).
    pub keep_logits: bool,
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
    /// With `Request::forced`: the logits before each forced id (`[ids, vocab]`).
    #[serde(skip)]
    pub logits: Vec<Vec<f32>>,
}

/// Prompts longer than this are counted on prefixes before they are tokenised whole.
const PREFIX_BYTES: usize = 256 << 10;

/// Answer positions the KV cache is sized for before decoding (the manifest's default answer length).
const RESERVE_AHEAD: usize = 1024;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl InternVL {
    /// Loads and cross-checks a model folder (manifest, graphs, tokenizer, embedding table).
    pub fn load(dir: &Path, opts: &RuntimeOptions, progress: bool) -> Result<Self> {
        let t0 = Instant::now();
        Self::open(Manifest::load(dir)?, opts, progress, t0)
    }

    /// [`InternVL::load`] of a manifest already read (a command that checked a request against it first);
    /// `t0` is when loading started.
    pub fn open(manifest: Manifest, opts: &RuntimeOptions, progress: bool, t0: Instant) -> Result<Self> {
        Self::open_unmarked(manifest, opts, progress, t0).kind(ErrorKind::Model)
    }

    fn open_unmarked(manifest: Manifest, opts: &RuntimeOptions, progress: bool, t0: Instant) -> Result<Self> {
        let bar = spinner(progress, "loading model");
        let tokenizer =
            Tokenizer::load(&manifest.path(&manifest.tokenizer.file))?.decoding_as(&manifest.tokenizer.answer);
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

    /// The ids of `text` with `tiles` tiles per image, refused (before the work) when they cannot fit the
    /// context: text longer than the context could hold in bytes is refused before it is tokenised.
    fn prompt_ids(&self, text: &str, tiles: &[usize]) -> Result<Vec<u32>> {
        let ctx = self.manifest.decoder.max_context;
        let image_positions = tiles.iter().sum::<usize>().saturating_mul(self.manifest.vision.tokens_per_tile);
        ensure!(
            image_positions < ctx,
            "the images need {image_positions} positions ({} tiles) but the model's context is {ctx} tokens; use fewer images or tiles (max_tiles)",
            tiles.iter().sum::<usize>()
        );
        ensure!(
            text.len() <= self.max_prompt_bytes(),
            "the prompt is {} bytes, more than the model's context of {ctx} tokens can hold ({} bytes at most)",
            text.len(),
            self.max_prompt_bytes()
        );
        self.check_token_count(text)?;
        let full = prompt::token_ids(&self.manifest, &self.tokenizer, text, tiles, true)?;
        ensure!(
            full.len() < ctx,
            "the prompt is {} tokens ({} tiles) but the model's context is {ctx} tokens; use fewer tiles (max_tiles) or a shorter prompt",
            full.len(),
            tiles.iter().sum::<usize>()
        );
        Ok(full)
    }

    /// Tokenising takes about 200 bytes of memory per token for a moment, so a long text (12 M tokens of
    /// CJK fit under the byte bound) is counted on growing prefixes first: when a prefix alone has twice
    /// the context in tokens, the whole text cannot fit (a prefix's tokens are the whole text's, but at the
    /// cut), and it is refused at the cost of that prefix.
    fn check_token_count(&self, text: &str) -> Result<()> {
        let ctx = self.manifest.decoder.max_context;
        let mut len = PREFIX_BYTES;
        while len < text.len() {
            let mut cut = len;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let n = self.tokenizer.encode(&text[..cut], false)?.len();
            ensure!(
                n <= 2 * ctx,
                "the prompt is more than {n} tokens (counted on its first {cut} bytes) but the model's context is {ctx} tokens"
            );
            len *= 4;
        }
        Ok(())
    }

    /// Most prompt bytes that could still fit the context: every token covers at most the longest
    /// vocabulary entry's bytes, and normalisation (NFC, NFKC) at most halves a text.
    pub fn max_prompt_bytes(&self) -> usize {
        self.manifest.decoder.max_context.saturating_mul(self.tokenizer.max_token_bytes()).saturating_mul(2)
    }

    /// The vision and decoder graph files opened (portable or AMX variants).
    pub fn graph_files(&self) -> [&str; 2] {
        [&self.vision.file, &self.decoder.file]
    }

    /// The LLM stage on its own (benchmarks time decode steps at a chosen context).
    pub fn decoder_mut(&mut self) -> &mut Decoder {
        &mut self.decoder
    }

    pub fn new_conversation(&self) -> Result<Conversation> {
        Ok(Conversation {
            cache: self.decoder.empty_cache()?,
            ids: Vec::new(),
            image_rows: Vec::new(),
            tiles: Vec::new(),
            history: Vec::new(),
            system: None,
            short_rope: false,
            broken: false,
        })
    }

    /// The next turn of `conv`: `question` (with `<image>` placeholders for `images`, or none). The prompt is
    /// the whole conversation as the reference `chat(history=...)` builds it (earlier answers as their
    /// stripped text); the cache is kept up to the first position where that prompt's ids differ from what
    /// it holds, so usually only the new turn runs through the decoder.
    pub fn chat(
        &mut self,
        conv: &mut Conversation,
        question: &str,
        images: &[RgbImage],
        opts: &Request,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Output> {
        if conv.history.is_empty() && conv.ids.is_empty() {
            conv.system = opts.system.clone();
        }
        let question = prompt::place_images(question, images.len());
        let text = prompt::render(&self.manifest.template, &conv.history, &question, conv.system.as_deref(), 0);
        let out = self.turn(conv, &text, images, opts, on_text)?;
        conv.history.push(prompt::Turn { user: question, assistant: out.text.clone() });
        Ok(out)
    }

    fn turn(
        &mut self,
        conv: &mut Conversation,
        text: &str,
        images: &[RgbImage],
        req: &Request,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Output> {
        req.sampling.validate().kind(ErrorKind::Usage)?;
        if let Some(n) = req.max_tiles {
            ensure!((1..=MAX_TILES).contains(&n), "max_tiles {n} must be between 1 and {MAX_TILES}");
        }
        ensure!(!conv.broken, "this conversation's cache was lost in an earlier error; start a new one");
        let start = Instant::now();
        let hidden = self.manifest.decoder.hidden;

        // Prompt: the whole conversation's ids (the images of earlier turns keep their tile counts), from
        // the images' sizes alone, so a request too long for the context costs no pixel work.
        let cfg = self.image_config(req.max_tiles);
        let counts: Vec<usize> = images.iter().map(|img| tile_count(img.width(), img.height(), &cfg)).collect();
        let all_tiles: Vec<usize> = conv.tiles.iter().chain(&counts).copied().collect();
        let full = self.prompt_ids(text, &all_tiles).kind(ErrorKind::Input)?;
        let ctx = self.manifest.decoder.max_context;
        let total = full.len();

        // Preprocess.
        let mut tiles: Vec<_> = images.iter().map(|img| preprocess(img, &cfg)).collect::<Result<_>>()?;
        ensure!(
            tiles.iter().map(|t| t.count).eq(counts.iter().copied()),
            "internal error: tiles made differ from tiles counted"
        );
        let preprocess_ms = ms(start);
        // Positions the cache can keep: those whose ids are unchanged (at least the last one is run, for its
        // logits). LongRoPE: the reference runs a conversation past the switch point with the long factors
        // throughout, so positions computed with the short ones are recomputed.
        let mut keep = conv.ids.iter().zip(&full).take_while(|(a, b)| a == b).count().min(total - 1);
        let after = self.manifest.decoder.long_rope_after;
        if conv.short_rope && after.is_some_and(|a| total > a) {
            keep = 0;
        }
        let ids = &full[keep..];

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

        // Embed: text rows from the table, image rows (earlier turns' kept, then this turn's from the vision
        // graph) at the <IMG_CONTEXT> positions.
        let t = Instant::now();
        let ctx_id = self.manifest.tokenizer.img_context_id;
        let (old_rows, new_rows) = (conv.image_rows.len() / hidden, image_embeds.len() / hidden);
        ensure!(
            full.iter().filter(|&&id| id == ctx_id).count() == old_rows + new_rows,
            "image token count does not match the vision output"
        );
        let row = |k: usize| match k.checked_sub(old_rows) {
            None => &conv.image_rows[k * hidden..(k + 1) * hidden],
            Some(j) => &image_embeds[j * hidden..(j + 1) * hidden],
        };
        let mut embeds = Vec::with_capacity(ids.len() * hidden);
        let mut next_image_row = full[..keep].iter().filter(|&&id| id == ctx_id).count();
        let mut run_start = 0;
        for (i, &id) in ids.iter().enumerate() {
            if id == ctx_id {
                self.embeddings.lookup_into(&ids[run_start..i], &mut embeds)?;
                run_start = i + 1;
                embeds.extend_from_slice(row(next_image_row));
                next_image_row += 1;
            }
        }
        self.embeddings.lookup_into(&ids[run_start..], &mut embeds)?;

        // Prefill. From here on the cache changes: a failure leaves the conversation unusable.
        conv.broken = true;
        if conv.image_rows.is_empty() {
            conv.image_rows = image_embeds; // moved, not copied (a one-shot run's only images)
        } else {
            conv.image_rows.extend_from_slice(&image_embeds);
        }
        conv.tiles.extend(&counts);
        self.decoder.truncate(&mut conv.cache, keep)?;
        if keep == 0 {
            // A call ending at or before LongRoPE's switch point computes its positions with the short factors.
            conv.short_rope = after.is_some_and(|a| total <= a);
        }
        let budget = req.forced.as_ref().map_or(req.max_new_tokens, Vec::len).min(ctx - total);
        // Room for the answer up to the default answer length: a large max_new_tokens does not allocate
        // the whole context's cache (8 GB for an 8B model) for an answer that stops after a sentence;
        // longer answers grow it by doubling.
        self.decoder.reserve(&mut conv.cache, total + budget.min(RESERVE_AHEAD))?;
        let bar = counter(self.progress, ids.len() as u64, "prefill tokens");
        let mut logits = self.decoder.forward(&embeds, &mut conv.cache, req.prefill_chunk, |n| bar.inc(n as u64))?;
        bar.finish_and_clear();
        let prefill_ms = ms(t);

        // Decode.
        let t = Instant::now();
        let mut sampler = Sampler::new(req.sampling.clone());
        let prompt_tokens = ids.len();
        conv.ids = full; // then every generated token the decoder runs: also the sampler's context
        let mut generated = Vec::new();
        let mut answer = AnswerStream::new(self.manifest.tokenizer.answer.split_at.as_deref());
        let mut first_token_ms = 0.0;
        let mut finish_reason = "length";
        let mut steps = 0usize;
        let mut forced_logits = Vec::new();
        while generated.len() < budget {
            let id = match &req.forced {
                Some(ids) => {
                    if req.keep_logits {
                        forced_logits.push(logits.clone());
                    }
                    ids[generated.len()]
                }
                None => sampler.next(&mut logits, &conv.ids),
            };
            if generated.is_empty() {
                first_token_ms = ms(start);
            }
            if !req.ignore_stop && req.forced.is_none() && self.manifest.tokenizer.stop_ids.contains(&id) {
                finish_reason = "stop";
                break;
            }
            generated.push(id);
            if let Some(piece) = answer.push(&self.tokenizer, id)? {
                on_text(&piece)?;
            }
            if generated.len() == budget {
                break; // not run: the next turn re-tokenises the answer anyway
            }
            let mut row = Vec::with_capacity(hidden);
            self.embeddings.lookup_into(&[id], &mut row)?;
            logits = self.decoder.forward(&row, &mut conv.cache, 1, |_| ())?;
            conv.ids.push(id);
            steps += 1;
        }
        // What the reference returns (and what the next turn's history holds); the stream added up to it.
        let (rest, text) = answer.finish(&self.tokenizer)?;
        if let Some(piece) = rest {
            on_text(&piece)?; // trailing text held back in case it began the separator
        }
        conv.broken = false;
        let decode_ms = ms(t);
        Ok(Output {
            text,
            prompt_tokens,
            generated_tokens: generated.len(),
            token_ids: generated,
            tiles: total_tiles,
            finish_reason,
            logits: forced_logits,
            timings: Timings {
                load_ms: self.load_ms,
                preprocess_ms,
                vision_ms,
                prefill_ms,
                first_token_ms,
                decode_ms,
                prefill_tokens_per_s: prompt_tokens as f64 / (prefill_ms / 1e3),
                decode_tokens_per_s: steps as f64 / (decode_ms / 1e3),
            },
        })
    }
}

/// A conversation kept between turns: the KV cache of everything said so far, so a new turn only runs
/// its own tokens through the decoder.
pub struct Conversation {
    cache: KvCache,
    /// The ids whose keys and values the cache holds, in order.
    ids: Vec<u32>,
    /// Image embeddings of every `<IMG_CONTEXT>` position so far, in order: a re-run from an earlier
    /// position needs them again.
    image_rows: Vec<f32>,
    /// Tiles of each image so far, in order.
    tiles: Vec<usize>,
    /// Earlier turns as the reference's `history` holds them: question with its `<image>` lines, stripped answer.
    history: Vec<prompt::Turn>,
    system: Option<String>,
    /// LongRoPE: the cache holds positions computed with the short factors.
    short_rope: bool,
    /// A turn failed after touching the cache.
    broken: bool,
}

impl Conversation {
    /// A turn failed after touching the cache: only a new conversation can go on.
    pub fn is_broken(&self) -> bool {
        self.broken
    }
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
