//! A loaded model folder, shared by every request: the manifest, the tokenizer, and the stages that
//! compute (vision encoder, token embeddings, decoder with its KV cache), plus the vision-feature cache. `Send + Sync` with a `&self` API: each
//! stage locks its own session, so a server's request threads can tokenise, count tiles and preprocess
//! while the engine thread runs the graphs.

pub mod decoder;
mod inputs;
mod request;
pub mod token_embeddings;
pub mod vision;

pub use inputs::ImageRows;
pub use request::{Content, Params, Prepared};
pub(crate) use request::{ImageSource, PreparedImage};

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{ensure, Result};

use crate::error::{context_overflow, ErrorKind, WithKind};
use crate::limits;
use crate::manifest::Manifest;
use crate::media::image::ImageConfig;
use crate::media::{EncodedImage, MediaCache, MediaKey};
use crate::model::decoder::Decoder;
use crate::model::token_embeddings::Embeddings;
use crate::model::vision::VisionEncoder;
use crate::notice::{self, Notice};
use crate::runtime::{self, Device, RuntimeOptions};
use crate::text::prompt;
use crate::text::tokenizer::Tokenizer;

/// Vision features kept across requests by default (about 13 x 256 x 896 floats per 13-tile image of a
/// 1B model: 12 MB; 256 MB keeps the last 20 such images).
pub const DEFAULT_MEDIA_CACHE_BYTES: usize = 256 << 20;

pub struct Model {
    pub manifest: Manifest,
    pub tokenizer: Tokenizer,
    pub(crate) embeddings: Embeddings,
    pub(crate) vision: VisionEncoder,
    pub(crate) decoder: Decoder,
    pub(crate) media: Mutex<MediaCache>,
    pub load_ms: f64,
    /// Where the graphs run (`auto` resolved).
    pub device: Device,
}

/// Prompts longer than this are counted on prefixes before they are tokenised whole.
const PREFIX_BYTES: usize = 256 << 10;

impl Model {
    /// Loads and cross-checks a model folder (manifest, graphs, tokenizer, embedding table).
    pub fn load(dir: &Path, opts: &RuntimeOptions) -> Result<Self> {
        let t0 = Instant::now();
        Self::open(Manifest::load(dir)?, opts, t0)
    }

    /// [`Model::load`] of a manifest already read (a command that checked a request against it first);
    /// `t0` is when loading started, for `load_ms`.
    pub fn open(manifest: Manifest, opts: &RuntimeOptions, t0: Instant) -> Result<Self> {
        Self::open_unmarked(manifest, opts, t0).kind(ErrorKind::Model)
    }

    fn open_unmarked(manifest: Manifest, opts: &RuntimeOptions, t0: Instant) -> Result<Self> {
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
        let mut resolved = runtime::resolve(&manifest, opts)?;
        let (vision, decoder) = loop {
            let stages =
                VisionEncoder::load(&manifest, &resolved).and_then(|v| Ok((v, Decoder::load(&manifest, &resolved)?)));
            // `auto` is the one case where a GPU that does not start falls back (TensorRT, CUDA, then the
            // CPU), said on stderr.
            let next = match resolved.device {
                Device::Tensorrt => Device::Cuda,
                _ => Device::Cpu,
            };
            match stages {
                Err(e) if opts.device == Device::Auto && resolved.device != Device::Cpu => {
                    let error = format!("{e:#}");
                    notice::emit(Notice::DeviceFailed { device: resolved.device, error, next });
                    resolved = runtime::resolve(&manifest, &RuntimeOptions { device: next, ..resolved.clone() })?;
                }
                stages => break stages?,
            }
        };
        let device = resolved.device;
        if let runtime::providers::Fit::Slow(why) = runtime::providers::fit(&manifest, device) {
            notice::emit(Notice::Slow(why));
        }
        let media = Mutex::new(MediaCache::new(DEFAULT_MEDIA_CACHE_BYTES));
        Ok(Self {
            manifest,
            tokenizer,
            embeddings,
            vision,
            decoder,
            media,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            device,
        })
    }

    /// Bytes of vision features kept across requests (0: none).
    pub fn set_media_cache_bytes(&self, bytes: usize) {
        self.media_cache().set_limit(bytes);
    }

    /// The vision-feature cache (a server reports its size).
    pub fn media_cache(&self) -> std::sync::MutexGuard<'_, MediaCache> {
        self.media.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The cached vision features of an image, if an earlier request encoded it with the same tiling.
    pub fn cached_image(&self, key: &MediaKey) -> Option<std::sync::Arc<EncodedImage>> {
        self.media_cache().get(key)
    }

    /// The tiling of a request: the manifest's, with its tile limit replaced by `max_tiles`, checked.
    pub fn image_config(&self, max_tiles: Option<u32>) -> Result<ImageConfig> {
        limits::image_config(&self.manifest, max_tiles)
    }

    /// Image embeddings `[tiles, tokens_per_tile, hidden]` for normalised tiles `[tiles, 3, size, size]`.
    pub fn encode_tiles(&self, pixels: &[f32], tiles: usize, batch: usize) -> Result<Vec<f32>> {
        self.vision.encode(pixels, tiles, batch)
    }

    /// The ids of `text` with `tiles` tiles per image, refused (before the work) when they cannot fit the
    /// context: text longer than the context could hold in bytes is refused before it is tokenised.
    pub fn prompt_ids(&self, text: &str, tiles: &[usize]) -> Result<Vec<u32>> {
        let ctx = self.manifest.decoder.max_context;
        limits::check_tiles_fit(tiles.iter().sum(), &self.manifest)?;
        if text.len() > self.max_prompt_bytes() {
            return Err(context_overflow(format!(
                "the prompt is {} bytes, more than the model's context of {ctx} tokens can hold ({} bytes at most)",
                text.len(),
                self.max_prompt_bytes()
            )));
        }
        self.check_token_count(text)?;
        let full = prompt::token_ids(&self.manifest, &self.tokenizer, text, tiles, true)?;
        if full.len() >= ctx {
            return Err(context_overflow(format!(
                "the prompt is {} tokens ({} tiles) but the model's context is {ctx} tokens; use fewer tiles (max_tiles) or a shorter prompt",
                full.len(),
                tiles.iter().sum::<usize>()
            )));
        }
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
            if n > 2 * ctx {
                return Err(context_overflow(format!(
                    "the prompt is more than {n} tokens (counted on its first {cut} bytes) but the model's context is {ctx} tokens"
                )));
            }
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
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// The model's name as the manifest gives it (the API's model id).
    pub fn name(&self) -> &str {
        &self.manifest.name
    }
}
