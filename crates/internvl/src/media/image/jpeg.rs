//! JPEG decoded as Pillow decodes it: by libjpeg-turbo itself, with Pillow's settings and Pillow's own
//! colour handling after it.
//!
//! The reference's `Image.open(f).convert('RGB')` runs libjpeg-turbo (bundled in Pillow's wheels) with
//! its defaults: accurate integer IDCT (`JDCT_ISLOW`), fancy (triangle-filter) chroma upsampling, the
//! colour space libjpeg infers from the JFIF / Adobe markers. Any other decoder differs by a few levels
//! on most pixels, which flips tokens. So this module links libjpeg-turbo (built from source by
//! `turbojpeg-sys`, statically) and calls its TurboJPEG API, whose defaults are the same settings:
//!
//! * 1 component: grayscale, replicated into R, G and B (Pillow's `L` -> `RGB`).
//! * 3 components: YCbCr -> RGB (or RGB as stored, Adobe transform 0) by libjpeg's own converter.
//! * 4 components: Pillow opens them as `CMYK` with the raw mode `CMYK;I`, i.e. it always assumes
//!   Adobe's inverted polarity, asks libjpeg for CMYK (which turns YCCK into CMYK), then converts with
//!   its own formula ([`cmyk_to_rgb`]).
//!
//! Where Pillow refuses, so does this: other component counts, other sample precisions, a file that ends
//! before its end-of-image marker (Pillow's "image file is truncated"). libjpeg warnings about corrupt
//! entropy data are ignored, as Pillow ignores them, so such a file decodes; past the damage its pixels
//! follow libjpeg's error recovery, which does not always match Pillow's (tests/jpeg.rs). Arithmetic-coded
//! files decode whatever their size, while Pillow, feeding libjpeg in 64 KiB blocks that its arithmetic
//! decoder cannot suspend on, refuses those above 64 KiB.

use anyhow::{bail, Result};
use std::ffi::CStr;
use turbojpeg_sys as tj;

/// A progressive JPEG may carry any number of scans, each one a pass over the whole coefficient buffer;
/// a crafted file with millions of tiny scans takes hours. libjpeg-turbo's documentation suggests this
/// limit for untrusted input; real encoders write about ten.
const MAX_SCANS: i32 = 500;

/// What the marker walk found before any pixel work.
#[derive(Debug)]
pub struct Markers<'a> {
    /// The TIFF payload of the first `Exif` APP1 segment (for `--exif`).
    pub exif: Option<&'a [u8]>,
}

/// Walks the marker structure: segments are skipped by their length (so an EXIF thumbnail's EOI does not
/// count); entropy-coded data is scanned for the next real marker (`FF` not followed by a stuffed `00` or
/// a restart marker). Fails, as Pillow does, when the data ends before an end-of-image marker.
pub fn walk_markers(data: &[u8]) -> Result<Markers<'_>> {
    const TRUNCATED: &str = "image file is truncated (JPEG data ends before the end-of-image marker)";
    if !data.starts_with(&[0xFF, 0xD8]) {
        bail!("not a JPEG file (no start-of-image marker)");
    }
    let n = data.len();
    let mut exif = None;
    let mut i = 2;
    while i < n {
        if data[i] != 0xFF {
            // Entropy-coded data (or junk that libjpeg skips with a warning).
            match data[i..].iter().position(|&b| b == 0xFF) {
                Some(off) => i += off,
                None => bail!(TRUNCATED),
            }
            continue;
        }
        let mut j = i + 1;
        while j < n && data[j] == 0xFF {
            j += 1; // fill bytes
        }
        if j >= n {
            bail!(TRUNCATED);
        }
        match data[j] {
            0xD9 => return Ok(Markers { exif }),
            // Stuffed zero, restart markers, TEM, SOI: no length field.
            0x00 | 0x01 | 0xD0..=0xD8 => i = j + 1,
            marker => {
                if j + 2 >= n {
                    bail!(TRUNCATED);
                }
                let len = usize::from(u16::from_be_bytes([data[j + 1], data[j + 2]]));
                if len < 2 {
                    bail!("corrupt JPEG: segment length {len} of marker 0x{marker:02X} at byte {j}");
                }
                let end = j + 1 + len;
                if end > n {
                    bail!(TRUNCATED);
                }
                let payload = &data[j + 3..end];
                if marker == 0xE1 && exif.is_none() && payload.starts_with(b"Exif\0\0") {
                    exif = Some(&payload[6..]);
                }
                i = end;
            }
        }
    }
    bail!(TRUNCATED)
}

/// A TurboJPEG decompressor, destroyed on drop.
struct Handle(tj::tjhandle);

impl Handle {
    fn new() -> Result<Self> {
        // SAFETY: tj3Init has no preconditions; a null result is checked.
        let h = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as i32) };
        if h.is_null() {
            bail!("cannot initialise libjpeg-turbo's decompressor");
        }
        Ok(Self(h))
    }

    fn get(&self, param: tj::TJPARAM) -> i32 {
        // SAFETY: the handle is live; unknown parameters return -1.
        unsafe { tj::tj3Get(self.0, param as i32) }
    }

    fn set(&self, param: tj::TJPARAM, value: i32) -> Result<()> {
        // SAFETY: the handle is live.
        if unsafe { tj::tj3Set(self.0, param as i32, value) } != 0 {
            bail!("libjpeg-turbo: {}", self.error());
        }
        Ok(())
    }

    fn error(&self) -> String {
        // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the handle.
        let msg = unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) };
        super::decode::one_line(msg.to_string_lossy())
    }

    /// True when the last failure was only a warning (the image was still decoded completely).
    fn last_was_warning(&self) -> bool {
        // SAFETY: the handle is live.
        unsafe { tj::tj3GetErrorCode(self.0) == tj::TJERR_TJERR_WARNING as i32 }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

/// The header fields decoding needs.
pub struct Header {
    pub width: u32,
    pub height: u32,
    components: Layout,
}

#[derive(Clone, Copy)]
enum Layout {
    /// Gray, YCbCr or RGB: libjpeg converts to RGB.
    Rgb,
    /// CMYK or YCCK: libjpeg gives CMYK, Pillow's formula gives RGB.
    Cmyk,
}

/// A JPEG whose header has been read; pixels come from [`Jpeg::decode`].
pub struct Jpeg<'a> {
    handle: Handle,
    data: &'a [u8],
    pub header: Header,
}

impl<'a> Jpeg<'a> {
    /// Reads the frame header (no pixel memory yet), refusing what Pillow refuses.
    pub fn open(data: &'a [u8]) -> Result<Self> {
        let handle = Handle::new()?;
        // SAFETY: data is a live slice of the given length.
        if unsafe { tj::tj3DecompressHeader(handle.0, data.as_ptr(), data.len() as tj::size_t) } != 0 {
            bail!("cannot decode JPEG image (corrupt header): {}", handle.error());
        }
        let (w, h) = (handle.get(tj::TJPARAM_TJPARAM_JPEGWIDTH), handle.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT));
        let (Ok(width @ 1..), Ok(height @ 1..)) = (u32::try_from(w), u32::try_from(h)) else {
            bail!("cannot decode JPEG image: no frame with a valid size (a tables-only or empty JPEG)");
        };
        let precision = handle.get(tj::TJPARAM_TJPARAM_PRECISION);
        if precision != 8 {
            bail!("cannot decode JPEG image: {precision}-bit samples (only 8-bit JPEG is supported, as in Pillow)");
        }
        let components = match handle.get(tj::TJPARAM_TJPARAM_COLORSPACE) as tj::TJCS {
            tj::TJCS_TJCS_GRAY | tj::TJCS_TJCS_YCbCr | tj::TJCS_TJCS_RGB => Layout::Rgb,
            tj::TJCS_TJCS_CMYK | tj::TJCS_TJCS_YCCK => Layout::Cmyk,
            _ => bail!("cannot decode JPEG image: unsupported colour space or component count"),
        };
        Ok(Self { handle, data, header: Header { width, height, components } })
    }

    /// Decodes to 8-bit RGB, `width * height * 3` bytes. The caller has bounded the pixel count.
    pub fn decode(self) -> Result<Vec<u8>> {
        let Header { width, height, components } = self.header;
        let (format, channels) = match components {
            Layout::Rgb => (tj::TJPF_TJPF_RGB, 3usize),
            Layout::Cmyk => (tj::TJPF_TJPF_CMYK, 4usize),
        };
        let h = &self.handle;
        h.set(tj::TJPARAM_TJPARAM_SCANLIMIT, MAX_SCANS)?;
        let pitch = width as usize * channels;
        let mut pixels = vec![0u8; pitch * height as usize];
        // SAFETY: `pixels` holds height rows of `pitch` bytes, the size tj3Decompress8 writes for this
        // header at scale 1/1; `data` is live for the call.
        let rc = unsafe {
            tj::tj3Decompress8(
                h.0,
                self.data.as_ptr(),
                self.data.len() as tj::size_t,
                pixels.as_mut_ptr(),
                pitch as i32,
                format,
            )
        };
        if rc != 0 && !h.last_was_warning() {
            bail!("cannot decode JPEG image (corrupt or truncated file): {}", h.error());
        }
        Ok(match components {
            Layout::Rgb => pixels,
            Layout::Cmyk => cmyk_to_rgb(&pixels),
        })
    }
}

/// Pillow's `CMYK;I` unpacking (inverted samples) followed by its `cmyk2rgb`:
/// `R = 255 - K' - C' * (255 - K') / 255` with `X' = 255 - X` and Pillow's rounding of the product
/// (`MULDIV255`: `(t + (t >> 8)) >> 8` with `t = a * b + 128`).
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        (t + (t >> 8)) >> 8
    };
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let nk = u32::from(px[3]); // 255 - K' where K' = 255 - K
        for &c in &px[..3] {
            let c_inv = 255 - u32::from(c);
            out.push(nk.saturating_sub(muldiv255(c_inv, nk)) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_walk() {
        // SOI, APP1 whose payload contains FF D9, SOS, entropy data with stuffing, EOI.
        let mut j = vec![0xFF, 0xD8, 0xFF, 0xE1, 0x00, 0x06, 0xFF, 0xD9, 0x00, 0x00];
        j.extend([0xFF, 0xDA, 0x00, 0x03, 0x01, 0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56]);
        assert!(walk_markers(&j).unwrap_err().to_string().contains("truncated"));
        j.extend([0xFF, 0xD9]);
        assert!(walk_markers(&j).is_ok());
        assert!(walk_markers(&j[..8]).is_err());
        // A segment length running past the end is truncation, not a panic.
        assert!(walk_markers(&[0xFF, 0xD8, 0xFF, 0xE0, 0x40, 0x00, 0x01]).is_err());
    }

    #[test]
    fn exif_payload_found() {
        let mut j = vec![0xFF, 0xD8, 0xFF, 0xE1, 0x00, 0x0C];
        j.extend(b"Exif\0\0II*\0");
        j.extend([0xFF, 0xD9]);
        assert_eq!(walk_markers(&j).unwrap().exif, Some(&b"II*\0"[..]));
    }

    #[test]
    fn empty_jpeg_is_refused_before_decoding() {
        let err = Jpeg::open(&[0xFF, 0xD8, 0xFF, 0xD9]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("no frame"), "{err}");
    }

    #[test]
    fn cmyk_formula_edges() {
        // Stored (inverted) CMYK: 255 = no ink.
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 255]), [0, 0, 0]);
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 0]), [0, 0, 0]);
        assert_eq!(cmyk_to_rgb(&[128, 255, 0, 200]), [100, 200, 0]);
    }
}
