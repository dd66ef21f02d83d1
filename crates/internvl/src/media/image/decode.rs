//! Decoding an image file the way `PIL.Image.open(path).convert('RGB')` does.
//!
//! JPEG goes to libjpeg-turbo with Pillow's settings ([`super::jpeg`]), so its pixels are Pillow's
//! bit for bit. Every other format is decoded by the `image` crate; what this module adds is Pillow's
//! semantics:
//!
//! * The format is detected from the file content only (like Pillow), never the extension,
//!   so a text file named `x.png` is "not a recognised image file" rather than a PNG error.
//! * Mode conversion follows Pillow, not the `image` crate: alpha is dropped without
//!   compositing; 16-bit RGB(A) and gray+alpha keep the high byte (Pillow unpacks them with
//!   `RGB;16B` etc.); 16-bit grayscale opens in Pillow as mode `I;16` whose `convert('RGB')`
//!   *clips* values above 255 to 255 (so most 16-bit gray images become nearly white).
//! * Truncated files are errors. Pillow raises "image file is truncated" for JPEGs without an
//!   end-of-image marker, while libjpeg would fill the missing part with gray and warn, so the
//!   JPEG marker structure is walked first.
//! * Images above Pillow's decompression-bomb limit are rejected before any pixel memory is
//!   allocated, and the decoder's own allocation limit is raised to 2 GiB so that large but
//!   legitimate photos (e.g. 8000x6000) decode.
//! * EXIF orientation is ignored unless asked for, like the reference (which never calls
//!   `ImageOps.exif_transpose`).

use super::jpeg;
use crate::error::{ErrorKind, WithKind};
use ::image::metadata::Orientation;
use ::image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, RgbImage};
use anyhow::{anyhow, bail, ensure, Result};
use std::io::Cursor;
use std::path::Path;

/// Largest accepted image, in pixels: Pillow raises `DecompressionBombError` above
/// `2 * Image.MAX_IMAGE_PIXELS` (2 * 89_478_485).
pub const MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;
/// Decoder allocation limit: the largest accepted image as 16-bit RGBA is ~1.4 GB.
const MAX_DECODER_ALLOC: u64 = 2 << 30;

const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

/// Makes any message safe to embed in a one-line error.
pub(super) fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string().replace(['\n', '\r'], " ")
}

/// Loads `path` as 8-bit RGB exactly like `Image.open(path).convert('RGB')`. With `apply_exif`, the EXIF orientation tag is
/// applied afterwards, like `ImageOps.exif_transpose`.
///
/// Every error is a single line that names the file.
pub fn load_image(path: &Path, apply_exif: bool) -> Result<RgbImage> {
    let shown = path.display();
    let data = crate::files::read_limited(path, crate::files::MAX_IMAGE_FILE, "image file").kind(ErrorKind::Input)?;
    if data.is_empty() {
        return Err(anyhow!("image file is empty (0 bytes): {shown}")).kind(ErrorKind::Input);
    }
    // One flat error (not a context chain) so that however the caller prints it, it is a
    // single line naming the file.
    decode_image(&data, apply_exif)
        .map_err(|e| anyhow!("cannot load image {shown}: {}", one_line(format!("{e:#}"))))
        .kind(ErrorKind::Input)
}

/// Width and height from `path`'s header, without decoding pixels: how a request's tiles are counted
/// before the work. Errors as [`load_image`]'s.
pub fn image_dimensions(path: &Path) -> Result<(u32, u32)> {
    let shown = path.display();
    let data = crate::files::read_limited(path, crate::files::MAX_IMAGE_FILE, "image file").kind(ErrorKind::Input)?;
    dimensions_of(&data)
        .map_err(|e| anyhow!("cannot load image {shown}: {}", one_line(format!("{e:#}"))))
        .kind(ErrorKind::Input)
}

/// Width and height of an in-memory image file from its header, checked against the pixel limit.
pub fn dimensions_of(data: &[u8]) -> Result<(u32, u32)> {
    let probe = || -> Result<(u32, u32)> {
        ensure!(!data.is_empty(), "the image is empty (0 bytes)");
        let reader = ImageReader::new(Cursor::new(data))
            .with_guessed_format()
            .map_err(|e| anyhow!("cannot read image data: {}", one_line(e)))?;
        let (w, h) = match reader.format() {
            Some(ImageFormat::Jpeg) => {
                let header = jpeg::Jpeg::open(data)?.header;
                (header.width, header.height)
            }
            Some(format) => reader.into_dimensions().map_err(|e| decode_error(format, e))?,
            None => bail!("not a recognised image file (unknown format)"),
        };
        check_pixels(w, h)?;
        Ok((w, h))
    };
    probe().kind(ErrorKind::Input)
}

/// Decodes an in-memory image file (what [`load_image`] read, or a request body's bytes); errors do not
/// include a file name.
pub fn decode_image(data: &[u8], apply_exif: bool) -> Result<RgbImage> {
    let mut reader = ImageReader::new(Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| anyhow!("cannot read image data: {}", one_line(e)))?;
    let format = reader.format().ok_or_else(|| anyhow!("not a recognised image file (unknown format)"))?;
    match format {
        ImageFormat::Jpeg => return decode_jpeg(data, apply_exif),
        ImageFormat::Png => check_png_chunks(data)?,
        ImageFormat::WebP => check_riff_size(data)?,
        _ => {}
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODER_ALLOC);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(format, e))?;
    let (width, height) = decoder.dimensions();
    check_pixels(width, height)?;
    let orientation = if apply_exif {
        // A damaged EXIF block is not worth failing over: keep the stored orientation.
        decoder.orientation().unwrap_or(Orientation::NoTransforms)
    } else {
        Orientation::NoTransforms
    };
    let decoded = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(format, e))?;
    let gray16_png = png_is_16bit_gray(data);
    let rgb = to_rgb_like_pillow(decoded, gray16_png);
    Ok(if orientation == Orientation::NoTransforms {
        rgb
    } else {
        let mut img = DynamicImage::ImageRgb8(rgb);
        img.apply_orientation(orientation);
        img.into_rgb8()
    })
}

/// Refuses what Pillow refuses (its decompression-bomb error), before any pixel memory exists.
fn check_pixels(width: u32, height: u32) -> Result<()> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels > MAX_IMAGE_PIXELS {
        bail!(
            "image is too large: {width}x{height} = {pixels} pixels exceeds the limit of \
             {MAX_IMAGE_PIXELS} pixels (Pillow's decompression-bomb limit)"
        );
    }
    if pixels == 0 {
        bail!("image has no pixels ({width}x{height})");
    }
    Ok(())
}

/// Pillow's bound on one compressed PNG text or ICC chunk once inflated (`MAX_TEXT_CHUNK`, 1 MiB), and on
/// all text chunks together (`MAX_TEXT_MEMORY`, 64 MiB).
const PNG_MAX_CHUNK_INFLATED: u64 = 1 << 20;
const PNG_MAX_TEXT_MEMORY: u64 = 64 << 20;

/// Refuses, as Pillow does, a PNG whose `iCCP`, `zTXt` or compressed `iTXt` chunk inflates past 1 MiB (a
/// 3 MB file can hold a 3 GiB profile) or whose text adds up past 64 MiB (ICC profiles are counted in that
/// total too, which Pillow does not do: it bounds the work); inflation stops at the bound. A chunk whose zlib data is corrupt is skipped, as Pillow skips it.
fn check_png_chunks(data: &[u8]) -> Result<()> {
    use std::io::Read;
    let mut pos = PNG_SIGNATURE.len();
    let mut text = 0u64;
    while pos + 8 <= data.len() {
        let len = u32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let kind = &data[pos + 4..pos + 8];
        let Some(body) = data.get(pos + 8..(pos + 8).saturating_add(len)) else {
            break; // truncated: the decoder says so
        };
        let compressed = match kind {
            b"iCCP" | b"zTXt" => body.iter().position(|&b| b == 0).and_then(|i| body.get(i + 2..)),
            b"iTXt" => {
                // keyword \0 flag method language \0 translated keyword \0 text
                let key = body.iter().position(|&b| b == 0);
                match key.and_then(|i| body.get(i + 1..)) {
                    Some([1, 0, rest @ ..]) => {
                        let mut nul = rest.iter().enumerate().filter(|(_, &b)| b == 0).map(|(i, _)| i);
                        nul.nth(1).and_then(|i| rest.get(i + 1..))
                    }
                    _ => None,
                }
            }
            b"tEXt" => {
                text += body.len() as u64;
                None
            }
            b"IEND" => break,
            _ => None,
        };
        if let Some(z) = compressed {
            let mut out = Vec::new();
            let inflated = flate2::read::ZlibDecoder::new(z).take(PNG_MAX_CHUNK_INFLATED + 1).read_to_end(&mut out);
            let n = inflated.map_or(0, |_| out.len() as u64);
            if n > PNG_MAX_CHUNK_INFLATED {
                let name = String::from_utf8_lossy(kind);
                bail!("PNG {name} chunk inflates to more than {PNG_MAX_CHUNK_INFLATED} bytes (a decompression bomb; Pillow refuses it too)");
            }
            // ICC profiles count too: each is bounded, but many small chunks would add up to hours of inflating.
            text += n;
        }
        if text > PNG_MAX_TEXT_MEMORY {
            bail!("PNG text and ICC chunks inflate to more than {PNG_MAX_TEXT_MEMORY} bytes in all");
        }
        pos += 12 + len;
    }
    Ok(())
}

/// A WebP file shorter than its RIFF header says is truncated: libwebp (Pillow's decoder) refuses it, the
/// `image` crate would decode what is there.
fn check_riff_size(data: &[u8]) -> Result<()> {
    if data.len() >= 12 && data.starts_with(b"RIFF") {
        let size = u64::from(u32::from_le_bytes([data[4], data[5], data[6], data[7]]));
        if size + 8 > data.len() as u64 {
            bail!(
                "image file is truncated (WebP data ends early: the header says {} bytes, the file has {})",
                size + 8,
                data.len()
            );
        }
    }
    Ok(())
}

/// JPEG through libjpeg-turbo, as Pillow decodes it; EXIF orientation read from the APP1 segment.
fn decode_jpeg(data: &[u8], apply_exif: bool) -> Result<RgbImage> {
    let markers = jpeg::walk_markers(data)?;
    let jpeg = jpeg::Jpeg::open(data)?;
    let (width, height) = (jpeg.header.width, jpeg.header.height);
    check_pixels(width, height)?;
    let rgb = RgbImage::from_raw(width, height, jpeg.decode()?)
        .ok_or_else(|| anyhow!("JPEG decoder returned a buffer of the wrong size for {width}x{height}"))?;
    // A damaged EXIF block is not worth failing over: keep the stored orientation.
    let orientation = markers.exif.filter(|_| apply_exif).and_then(Orientation::from_exif_chunk);
    Ok(match orientation {
        Some(o) if o != Orientation::NoTransforms => {
            let mut img = DynamicImage::ImageRgb8(rgb);
            img.apply_orientation(o);
            img.into_rgb8()
        }
        _ => rgb,
    })
}

fn decode_error(format: ImageFormat, e: ImageError) -> anyhow::Error {
    let name = format!("{format:?}").to_uppercase();
    match e {
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            anyhow!("image file is truncated ({name} data ends early)")
        }
        ImageError::Unsupported(u) => anyhow!("unsupported image format or feature ({name}): {}", one_line(u)),
        ImageError::Limits(l) => anyhow!("image too large to decode ({name}): {}", one_line(l)),
        other => anyhow!("cannot decode {name} image (corrupt or truncated file): {}", one_line(other)),
    }
}

/// True for a PNG whose IHDR says 16-bit grayscale (colour type 0). Pillow opens those as
/// mode `I;16`, and the `image` crate turns one with a `tRNS` chunk into 16-bit gray+alpha,
/// which must still be converted with `I;16` rules rather than `LA` rules.
fn png_is_16bit_gray(data: &[u8]) -> bool {
    data.len() >= 26 && data.starts_with(PNG_SIGNATURE) && &data[12..16] == b"IHDR" && data[24] == 16 && data[25] == 0
}

/// Builds an RGB image from `channels`-sample pixels of `src` with `f`.
fn map_pixels<T: Copy>(width: u32, height: u32, src: &[T], channels: usize, f: impl Fn(&[T]) -> [u8; 3]) -> RgbImage {
    let mut out = Vec::with_capacity(src.len() / channels * 3);
    for px in src.chunks_exact(channels) {
        out.extend_from_slice(&f(px));
    }
    // `out` has exactly width * height * 3 bytes because `src` came from an image buffer of
    // the same size; the fallback is unreachable but avoids a panic path.
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

/// Pillow's `convert('RGB')` for each pixel layout the `image` crate can produce.
fn to_rgb_like_pillow(img: DynamicImage, gray16_png: bool) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let hi = |v: u16| (v >> 8) as u8;
    let clip = |v: u16| v.min(255) as u8;
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageRgba8(i) => map_pixels(w, h, i.as_raw(), 4, |p| [p[0], p[1], p[2]]),
        DynamicImage::ImageLuma8(i) => map_pixels(w, h, i.as_raw(), 1, |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(i) => map_pixels(w, h, i.as_raw(), 2, |p| [p[0]; 3]),
        DynamicImage::ImageLuma16(i) => map_pixels(w, h, i.as_raw(), 1, |p| [clip(p[0]); 3]),
        DynamicImage::ImageLumaA16(i) if gray16_png => map_pixels(w, h, i.as_raw(), 2, |p| [clip(p[0]); 3]),
        DynamicImage::ImageLumaA16(i) => map_pixels(w, h, i.as_raw(), 2, |p| [hi(p[0]); 3]),
        DynamicImage::ImageRgb16(i) => map_pixels(w, h, i.as_raw(), 3, |p| [hi(p[0]), hi(p[1]), hi(p[2])]),
        DynamicImage::ImageRgba16(i) => map_pixels(w, h, i.as_raw(), 4, |p| [hi(p[0]), hi(p[1]), hi(p[2])]),
        // Float images (e.g. float TIFF) have no Pillow RGB equivalent worth matching.
        other => other.to_rgb8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("internvl-decode-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, format).unwrap();
        buf.into_inner()
    }

    fn err_of(p: &Path) -> String {
        let e = load_image(p, false).unwrap_err().to_string();
        assert!(!e.contains('\n'), "multi-line error: {e}");
        assert!(e.contains(&p.display().to_string()), "error does not name the file: {e}");
        e
    }

    #[test]
    fn missing_file() {
        let p = std::env::temp_dir().join("internvl-definitely-missing.png");
        assert_eq!(err_of(&p), format!("image file not found: {}", p.display()));
    }

    #[test]
    fn empty_text_and_truncated_files() {
        assert!(err_of(&tmp("empty.png", b"")).contains("empty"));
        assert!(err_of(&tmp("text.png", b"hello, world\n")).contains("not a recognised image"));

        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(64, 48, |x, y| {
            ::image::Rgb([(x * 4) as u8, (y * 5) as u8, (x ^ y) as u8])
        }));
        let png = encode(&img, ImageFormat::Png);
        assert!(err_of(&tmp("half.png", &png[..png.len() / 2])).contains("truncated"));
        let jpg = encode(&img, ImageFormat::Jpeg);
        assert!(load_image(&tmp("ok.jpg", &jpg), false).is_ok());
        assert!(err_of(&tmp("half.jpg", &jpg[..jpg.len() / 2])).contains("truncated"));
        assert!(err_of(&tmp("noeoi.jpg", &jpg[..jpg.len() - 2])).contains("truncated"));
        let mut garbage = png.clone();
        for b in garbage.iter_mut().skip(60).step_by(7) {
            *b ^= 0x5A;
        }
        err_of(&tmp("garbage.png", &garbage));
    }

    #[test]
    fn pillow_mode_conversions() {
        let gray16 = ::image::ImageBuffer::<::image::Luma<u16>, _>::from_fn(3, 1, |x, _| {
            ::image::Luma([[7u16, 255, 4000][x as usize]])
        });
        let p = tmp("g16.png", &encode(&DynamicImage::ImageLuma16(gray16), ImageFormat::Png));
        let got = load_image(&p, false).unwrap();
        assert_eq!(got.as_raw(), &[7, 7, 7, 255, 255, 255, 255, 255, 255]);

        let rgb16 = ::image::ImageBuffer::<::image::Rgb<u16>, _>::from_raw(1, 1, vec![0x12FF, 0xAB00, 0x00FF]).unwrap();
        let p = tmp("rgb16.png", &encode(&DynamicImage::ImageRgb16(rgb16), ImageFormat::Png));
        assert_eq!(load_image(&p, false).unwrap().as_raw(), &[0x12, 0xAB, 0x00]);

        let rgba = ::image::RgbaImage::from_raw(1, 1, vec![10, 20, 30, 0]).unwrap();
        let p = tmp("rgba.png", &encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png));
        assert_eq!(load_image(&p, false).unwrap().as_raw(), &[10, 20, 30]);
    }
}
