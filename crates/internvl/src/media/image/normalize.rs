//! `ToTensor()` + `Normalize(mean, std)` for uint8 RGB tiles.
//!
//! torchvision computes `x.float().div(255)`, then `sub_(mean).div_(std)`, each a correctly
//! rounded float32 IEEE operation. A `u8` can take only 256 values, so the exact float32 result
//! of that three-step chain is tabulated per channel and then looked up: bit-identical to torch
//! and numpy (no fused multiply-add, no reciprocal multiplication) and much faster.

use ::image::RgbImage;

/// Per-channel lookup table of `((v as f32) / 255 - mean) / std` in float32.
fn channel_lut(mean: f32, std: f32) -> [f32; 256] {
    let mut lut = [0.0f32; 256];
    for (v, out) in lut.iter_mut().enumerate() {
        let x = v as f32 / 255.0f32;
        *out = (x - mean) / std;
    }
    lut
}

/// Writes `img` normalised into `out` in planar CHW order.
///
/// `out` should hold `3 * width * height` values; a shorter buffer is filled only as far as it
/// goes (never a panic), a longer one keeps its tail.
pub fn normalize_into(img: &RgbImage, mean: &[f32; 3], std: &[f32; 3], out: &mut [f32]) {
    let plane = img.width() as usize * img.height() as usize;
    let luts = [channel_lut(mean[0], std[0]), channel_lut(mean[1], std[1]), channel_lut(mean[2], std[2])];
    let (r, rest) = out.split_at_mut(plane.min(out.len()));
    let (g, b) = rest.split_at_mut(plane.min(rest.len()));
    let b_len = plane.min(b.len());
    let b = &mut b[..b_len];
    let pixels = img.as_raw().chunks_exact(3);
    for (((px, ro), go), bo) in pixels.zip(r).zip(g).zip(b) {
        *ro = luts[0][usize::from(px[0])];
        *go = luts[1][usize::from(px[1])];
        *bo = luts[2][usize::from(px[2])];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::image::{IMAGENET_MEAN, IMAGENET_STD};

    #[test]
    fn planar_layout_and_values() {
        let img = RgbImage::from_raw(2, 1, vec![0, 128, 255, 10, 20, 30]).unwrap();
        let mut out = vec![0.0f32; 6];
        normalize_into(&img, &IMAGENET_MEAN, &IMAGENET_STD, &mut out);
        // Bits of ((np.float32(v) / np.float32(255)) - mean) / std from numpy.
        let expected: [u32; 6] = [0xC007_8BBD, 0xBFF9_2C0A, 0x3E52_1B48, 0xBFD7_C0E5, 0x4028_F5C3, 0xBFA4_0A71];
        let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, expected);
    }
}
