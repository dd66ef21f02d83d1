//! Every bound on what one request may ask for, and the checks that apply them, in one place: the
//! command line, the server and the engine call these, so a rule cannot drift between them.
//!
//! Each check runs on what is known before the work it guards (image headers before decoding, the
//! prompt's bytes before tokenising), and fails as bad input (or, for a request that cannot fit the
//! model's context, as [`crate::error::ContextOverflow`], which a server maps to
//! `context_length_exceeded`).

use anyhow::{anyhow, Result};

use crate::error::{ErrorKind, WithKind};
use crate::manifest::Manifest;
use crate::media::image::{tile_count, ImageConfig, MAX_IMAGE_PIXELS};

/// Images one request may bring: each takes at least one tile of the context, and every file is read
/// twice (sizes first, then pixels).
pub const MAX_IMAGES: usize = 64;
/// Most frames per video: each is an image of the request.
pub const MAX_FRAMES: usize = MAX_IMAGES;
/// Tiles per video frame: the model card's `load_video(max_num=1)` resizes each frame whole to one tile.
pub const VIDEO_TILES_PER_FRAME: u32 = 1;
/// Most tiles per image a request may ask for (`--max-tiles`, `max_dynamic_patch`), as the reference's
/// `max_num` is used.
pub const MAX_TILES: u32 = 40;
/// Decoded pixels one request may hold at once: two images at Pillow's decompression-bomb limit.
pub const MAX_REQUEST_PIXELS: u64 = 2 * MAX_IMAGE_PIXELS;
/// Generation is bounded by the context too; this keeps the number itself sane.
pub const MAX_NEW_TOKENS: usize = 1 << 21;
/// Most prompt positions per prefill run: the largest context a manifest may declare (a larger chunk
/// than the prompt is the whole prompt in one run).
pub const MAX_PREFILL_CHUNK: usize = 1 << 21;
/// Most tiles per vision run: one tile already fills the cores (`vision::DEFAULT_BATCH`).
pub const MAX_VISION_BATCH: usize = 64;
/// Most intra-op threads: ONNX Runtime starts every one of them at load (100000 crash it), and more
/// threads than cores only slow a step down.
pub const MAX_THREADS: usize = 1024;
/// Logits a teacher-forced run may keep (`--logits-out` holds them until written): 2 GiB is 3500
/// positions of a 152k vocabulary.
pub const MAX_LOGITS_BYTES: u64 = 2 << 30;

/// Refuses more than [`MAX_IMAGES`] images.
pub fn check_image_count(images: usize) -> Result<()> {
    if images > MAX_IMAGES {
        return Err(anyhow!("{images} images given; at most {MAX_IMAGES} per request")).kind(ErrorKind::Input);
    }
    Ok(())
}

/// The tiling of a request: the manifest's, with its tile limit replaced by `max_tiles`, checked.
pub fn image_config(m: &Manifest, max_tiles: Option<u32>) -> Result<ImageConfig> {
    if let Some(n) = max_tiles {
        if !(1..=MAX_TILES).contains(&n) {
            return Err(anyhow!("max_tiles {n} must be between 1 and {MAX_TILES}")).kind(ErrorKind::Usage);
        }
    }
    Ok(ImageConfig { max_tiles: max_tiles.unwrap_or(m.image.max_tiles), ..m.image.clone() })
}

/// The tiling of a video's frames under `m`.
pub fn video_config(m: &Manifest) -> ImageConfig {
    ImageConfig { max_tiles: VIDEO_TILES_PER_FRAME, min_tiles: VIDEO_TILES_PER_FRAME, ..m.image.clone() }
}

/// The images of one request from their headers (`dims`: width and height of each): few enough, at
/// most [`MAX_REQUEST_PIXELS`] decoded, and their tiles within the model's context. Returns the pixels
/// they take decoded (a server's in-flight budget counts them).
pub fn check_images(dims: &[(u32, u32)], m: &Manifest, cfg: &ImageConfig) -> Result<u64> {
    check_image_count(dims.len())?;
    let pixels: u64 = dims.iter().map(|&(w, h)| u64::from(w) * u64::from(h)).sum();
    check_request_pixels(pixels)?;
    let tiles: usize = dims.iter().map(|&(w, h)| tile_count(w, h, cfg)).sum();
    check_tiles_fit(tiles, m)?;
    Ok(pixels)
}

/// Refuses images of more than [`MAX_REQUEST_PIXELS`] decoded pixels in all.
pub fn check_request_pixels(pixels: u64) -> Result<()> {
    if pixels > MAX_REQUEST_PIXELS {
        let msg =
            format!("the images have {pixels} pixels in all, more than the limit of {MAX_REQUEST_PIXELS} per request");
        return Err(anyhow!(msg)).kind(ErrorKind::Input);
    }
    Ok(())
}

/// Refuses `tiles` image tiles whose positions alone fill the model's context.
pub fn check_tiles_fit(tiles: usize, m: &Manifest) -> Result<()> {
    fits(tiles, m, |positions, ctx| {
        format!(
            "the images need {positions} positions ({tiles} tiles) but the model's context is {ctx} tokens; use fewer images or tiles (max_tiles)"
        )
    })
}

/// Refuses a video of `frames` frames (one tile each) whose tiles alone fill the model's context, before
/// any frame is decoded.
pub fn check_video_fits(frames: usize, m: &Manifest) -> Result<()> {
    let tiles = frames * VIDEO_TILES_PER_FRAME as usize;
    fits(tiles, m, |positions, ctx| {
        format!("{frames} frames need {positions} positions but the model's context is {ctx} tokens")
    })
}

/// A [`ContextOverflow`](crate::error::ContextOverflow) saying `why(positions, context)` when `tiles`
/// tiles take the whole context.
fn fits(tiles: usize, m: &Manifest, why: impl FnOnce(usize, usize) -> String) -> Result<()> {
    let (ctx, positions) = (m.decoder.max_context, tiles.saturating_mul(m.vision.tokens_per_tile));
    if positions >= ctx {
        return Err(crate::error::context_overflow(why(positions, ctx)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_pixels_and_tiles_are_refused_past_their_bounds() {
        assert!(check_image_count(MAX_IMAGES).is_ok());
        let e = check_image_count(MAX_IMAGES + 1).unwrap_err();
        assert_eq!(ErrorKind::of(&e), ErrorKind::Input);
        assert!(e.to_string().contains("65 images"), "{e}");
    }
}
