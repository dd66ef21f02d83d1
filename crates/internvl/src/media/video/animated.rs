//! Animated GIF and WebP as frame sources, decoded by the image crate (no FFmpeg needed). Frames are the
//! composited canvas, as FFmpeg's GIF decoder and Pillow's `seek` give them; alpha is dropped (Pillow's
//! `convert('RGB')`). The frame rate is the frame count over the summed frame delays.
//!
//! Two passes over the file: the first counts frames and their delays, keeping none; the second keeps
//! the chosen ones, resized.

use std::io::BufReader;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use image::{AnimationDecoder, ImageDecoder, RgbImage};

use crate::cancel::Cancel;

use super::{check_size, distinct, frame_index, in_order, to_tile, FrameSampling, Video, VideoInfo};

/// Frames an animation may have (each is decoded once per pass).
const MAX_ANIMATION_FRAMES: usize = 100_000;
/// Canvas pixels composited per pass, over all frames: every frame, however small, is composited onto the
/// whole canvas, so a 500-byte GIF of 1x1 frames on a 9000x9000 canvas costs seconds per frame count.
/// About a second of compositing: 3500 frames of 448x448, 340 of 1920x1080.
const MAX_ANIMATION_PIXELS: u64 = 4 * crate::media::image::MAX_IMAGE_PIXELS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Gif,
    WebP,
}

/// GIF or WebP by their magic bytes (a still WebP goes through here too: one frame).
pub(super) fn kind(head: &[u8]) -> Option<Kind> {
    if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
        Some(Kind::Gif)
    } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        Some(Kind::WebP)
    } else {
        None
    }
}

/// The canvas size, from the header (checked: a size that may be decoded).
pub(super) fn canvas(path: &Path, kind: Kind) -> Result<(u32, u32)> {
    frames(path, kind).map(|(w, h, _)| (w, h))
}

fn frames(path: &Path, kind: Kind) -> Result<(u32, u32, image::Frames<'static>)> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = BufReader::new(file);
    let (w, h, frames) = match kind {
        Kind::Gif => {
            let d = image::codecs::gif::GifDecoder::new(reader).context("not a readable GIF")?;
            let (w, h) = d.dimensions();
            check_size(w, h)?;
            (w, h, d.into_frames())
        }
        Kind::WebP => {
            let d = image::codecs::webp::WebPDecoder::new(reader).context("not a readable WebP")?;
            let (w, h) = d.dimensions();
            check_size(w, h)?;
            (w, h, d.into_frames())
        }
    };
    Ok((w, h, frames))
}

pub(super) fn load(path: &Path, kind: Kind, sampling: &FrameSampling, size: u32, cancel: &Cancel) -> Result<Video> {
    let (width, height, all) = frames(path, kind)?;
    // Frames that fit the compositing budget: checked before each is decoded.
    let canvas = u64::from(width) * u64::from(height);
    let most = MAX_ANIMATION_FRAMES.min(usize::try_from(MAX_ANIMATION_PIXELS / canvas).unwrap_or(usize::MAX));
    let (mut count, mut millis) = (0usize, 0f64);
    for frame in all {
        cancel.check()?;
        count += 1;
        if count > most {
            return Err(anyhow!(
                "more than {most} frames on a {width}x{height} canvas (at most {MAX_ANIMATION_FRAMES} frames and \
                 {MAX_ANIMATION_PIXELS} canvas pixels composited in all)"
            ));
        }
        let frame = frame.context("a damaged frame")?;
        let (n, d) = frame.delay().numer_denom_ms();
        millis += f64::from(n) / f64::from(d.max(1));
    }
    let fps = if millis > 0.0 { count as f64 * 1000.0 / millis } else { 0.0 };
    let indices = frame_index::frame_indices(sampling.bound, fps, count, sampling.frames)?;
    let wanted = distinct(&indices);
    let mut decoded = Vec::with_capacity(wanted.len());
    let (_, _, all) = frames(path, kind)?;
    for (i, frame) in all.enumerate().take(wanted.last().map_or(0, |l| l + 1)) {
        cancel.check()?;
        let frame = frame.context("a damaged frame")?;
        if wanted.binary_search(&i).is_ok() {
            let rgb: RgbImage = image::DynamicImage::ImageRgba8(frame.into_buffer()).to_rgb8();
            decoded.push(to_tile(&rgb, size));
        }
    }
    if decoded.len() < wanted.len() {
        return Err(anyhow!("decoded {} of the {} frames needed", decoded.len(), wanted.len()));
    }
    let info = VideoInfo {
        frames_total: count,
        fps,
        width,
        height,
        frame_indices: indices.clone(),
        decoder: match kind {
            Kind::Gif => "gif",
            Kind::WebP => "webp",
        }
        .into(),
    };
    Ok(Video { frames: in_order(&indices, &wanted, decoded), info })
}
