//! A request as the model sees it: what is asked ([`Content`]), how to answer ([`Params`]), and what
//! [`Model::prepare`] makes of them before any pixel work: the prompt ids, each image's tile count and
//! place among them, and features of images encoded before. Who runs it when is the engine's business.

use std::sync::Arc;
use std::time::Instant;

use ::image::RgbImage;
use anyhow::{ensure, Result};

use super::Model;
use crate::error::{ErrorKind, WithKind};
use crate::limits;
use crate::media::image::{tile_count, ImageConfig};
use crate::media::{EncodedImage, Media, MediaKey};
use crate::sampling::SamplingOptions;
use crate::text::prompt::{self, Turn};

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

/// One image of a prepared request: where its `tiles * tokens_per_tile` rows go in the prompt, and what
/// there is of it so far.
#[derive(Debug, Clone)]
pub(crate) struct PreparedImage {
    pub(crate) key: MediaKey,
    pub(crate) tiles: usize,
    /// Index in the prompt ids of this image's first `<IMG_CONTEXT>`.
    pub(crate) first: usize,
    pub(crate) source: ImageSource,
}

#[derive(Debug, Clone)]
pub(crate) enum ImageSource {
    /// Decoded pixels, still to be tiled and encoded.
    Pixels(Arc<RgbImage>),
    /// Features encoded before (a cache hit, or an earlier turn's), and the media as the request gave it.
    Encoded { features: Arc<EncodedImage>, original: Media },
}

/// A checked, tokenised request ready for an engine ([`crate::Sequence::new`]). Only [`Model::prepare`]
/// makes one: the engine relies on what it checked (budget within the context, forced ids, image places).
#[derive(Debug)]
pub struct Prepared {
    pub(crate) params: Params,
    /// Prompt ids, image tokens included.
    pub(crate) ids: Vec<u32>,
    /// Most ids to generate: `max_new_tokens` (or the forced ids), bounded by the context.
    pub(crate) budget: usize,
    pub(crate) images: Vec<PreparedImage>,
    /// How its images are tiled.
    pub(crate) image_cfg: ImageConfig,
    pub(crate) started: Instant,
}

impl Model {
    /// Checks a request, counts its tiles from the images' sizes and tokenises the prompt (a request too
    /// long for the context costs no pixel work), and takes cached features for images seen before.
    /// Tiling and the graphs run in an engine (tiling on its vision worker, when the image's turn comes,
    /// so a waiting request holds only its decoded pixels).
    pub fn prepare(&self, content: Content, params: Params) -> Result<Prepared> {
        let started = Instant::now();
        params.sampling.validate().kind(ErrorKind::Usage)?;
        let cfg = limits::image_config(&self.manifest, params.max_tiles)?;
        limits::check_image_count(content.images.len())?;
        let images: Vec<(MediaKey, ImageSource)> = content.images.into_iter().map(|m| self.source(m, &cfg)).collect();
        let counts: Vec<usize> = images
            .iter()
            .map(|(_, s)| match s {
                ImageSource::Pixels(image) => tile_count(image.width(), image.height(), &cfg),
                ImageSource::Encoded { features, .. } => features.tiles,
            })
            .collect();
        let text = prompt::render(
            &self.manifest.template,
            &content.history,
            &content.question,
            content.system.as_deref(),
            images.len(),
        );
        let ids = self.prompt_ids(&text, &counts).kind(ErrorKind::Input)?;
        let firsts = self.image_starts(&ids, &counts)?;
        let images = images
            .into_iter()
            .zip(counts)
            .zip(firsts)
            .map(|(((key, source), tiles), first)| PreparedImage { key, tiles, first, source })
            .collect();
        let ctx = self.manifest.decoder.max_context;
        let budget = params.forced.as_ref().map_or(params.max_new_tokens, Vec::len).min(ctx - ids.len());
        Ok(Prepared { params, ids, budget, images, image_cfg: cfg, started })
    }

    /// An image's key under `cfg`, and its cached features standing in for its pixels where an earlier
    /// request encoded it (a hit skips tiling and the vision graph).
    fn source(&self, media: Media, cfg: &ImageConfig) -> (MediaKey, ImageSource) {
        match media {
            Media::Pixels { sha256, image } => {
                let key = MediaKey { sha256, max_tiles: cfg.max_tiles };
                match self.cached_image(&key) {
                    Some(features) => {
                        metrics::counter!("internvl_vision_cache_hits_total").increment(1);
                        let original = Media::Encoded { key, features: Arc::clone(&features) };
                        (key, ImageSource::Encoded { features, original })
                    }
                    None => (key, ImageSource::Pixels(image)),
                }
            }
            Media::Encoded { key, ref features } => {
                let features = Arc::clone(features);
                (key, ImageSource::Encoded { features, original: media })
            }
        }
    }

    /// Where each image's `<IMG_CONTEXT>` run starts in `ids`.
    fn image_starts(&self, ids: &[u32], counts: &[usize]) -> Result<Vec<usize>> {
        let ctx_id = self.manifest.tokenizer.img_context_id;
        let per_tile = self.manifest.vision.tokens_per_tile;
        let mut firsts = Vec::with_capacity(counts.len());
        let mut i = 0;
        for &n in counts {
            while ids.get(i) != Some(&ctx_id) {
                i += 1;
                ensure!(i < ids.len(), "internal error: fewer image tokens than images");
            }
            firsts.push(i);
            i += n * per_tile;
        }
        Ok(firsts)
    }
}
