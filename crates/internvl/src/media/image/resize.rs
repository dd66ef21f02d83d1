//! Pillow-exact BICUBIC resampling of 8-bit RGB images.
//!
//! This is a port of `ImagingResample` from Pillow's `src/libImaging/Resample.c` for 8-bit
//! images, because InternVL's reference preprocessing resizes with Pillow and any other
//! bicubic implementation (different kernel support, float accumulation, rounding) changes
//! pixel values by a few levels. Pillow's algorithm:
//!
//! 1. Per output column (and, separately, per output row) it precomputes the filter taps in
//!    `f64`: bicubic kernel with `a = -0.5`, support `2.0` widened by the downscale factor,
//!    normalised to sum 1, then converted to fixed point with `PRECISION_BITS = 22`
//!    (rounding half away from zero).
//! 2. A horizontal pass (skipped when the width is unchanged) accumulates `u8 * i32` in an
//!    `i32` that starts at `1 << 21` (for rounding), then clips `acc >> 22` to 0..=255.
//!    When it runs first it computes only the source rows the vertical pass will read.
//! 3. A vertical pass (skipped when the height is unchanged) does the same along columns.
//!    Since Pillow 13 the vertical pass runs first when the height shrinks much more than the
//!    width (see [`horizontal_first`]); the intermediate rounding makes the order visible.
//!
//! Integer addition is associative, so the order in which taps are summed does not matter; only
//! the coefficients must be bit-identical, which is why [`precompute_coeffs`] follows the C
//! expression order exactly. The passes are written so the compiler can vectorise them
//! (the vertical pass runs over contiguous rows) and are split over a few threads for large
//! images; neither changes the result.

use ::image::RgbImage;

/// Fixed-point fraction bits used by Pillow for 8-bit images: `32 - 8 - 2`.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Initial accumulator value, i.e. +0.5 in fixed point, so that `>>` rounds.
const HALF: i32 = 1 << (PRECISION_BITS - 1);
/// Support of Pillow's bicubic filter at scale 1.
const BICUBIC_SUPPORT: f64 = 2.0;
/// Below this many multiply-adds a pass runs on the calling thread; thread start-up would
/// cost more than it saves.
const PARALLEL_MIN_WORK: usize = 2_000_000;
/// Upper bound on worker threads for one pass.
const MAX_THREADS: usize = 8;

/// Pillow's `bicubic_filter` with `a = -0.5`, operation order kept as in C.
#[inline]
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        return ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    }
    if x < 2.0 {
        return (((x - 5.0) * x + 8.0) * x - 4.0) * A;
    }
    0.0
}

/// Fixed-point resampling taps for one axis.
#[derive(Debug, Clone)]
struct Coeffs {
    /// Maximum taps per output sample (row stride of `kk`).
    ksize: usize,
    /// Per output sample: first source index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `out_size * ksize` fixed-point weights; unused tail entries are zero.
    kk: Vec<i32>,
}

impl Coeffs {
    #[inline]
    fn taps(&self, out: usize) -> (usize, &[i32]) {
        let (start, len) = self.bounds[out];
        (start, &self.kk[out * self.ksize..out * self.ksize + len])
    }
}

/// Port of Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`.
///
/// `in0`/`in1` are the crop box edges; Pillow passes them as C `float`, and computes
/// `in1 - in0` in single precision before widening, so they are `f32` here too.
fn precompute_coeffs(in_size: usize, in0: f32, in1: f32, out_size: usize) -> Coeffs {
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut weights = vec![0.0f64; ksize];
    let in_size_i = i64::try_from(in_size).unwrap_or(i64::MAX);
    for (xx, kout) in kk.chunks_exact_mut(ksize).enumerate() {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // `(int)` casts in C truncate toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size_i);
        let len = (xmax - xmin).max(0) as usize;
        let mut ww = 0.0f64;
        for (x, w) in weights.iter_mut().take(len).enumerate() {
            *w = bicubic_filter(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            ww += *w;
        }
        for (w, k) in weights.iter().take(len).zip(kout.iter_mut()) {
            let w = if ww != 0.0 { *w / ww } else { *w };
            let scaled = w * f64::from(1u32 << PRECISION_BITS);
            *k = if w < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
        }
        bounds.push((xmin as usize, len));
    }
    Coeffs { ksize, bounds, kk }
}

/// Pillow's `clip8`: `acc >> PRECISION_BITS` clamped to a byte.
#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Number of threads worth using for `work` multiply-adds spread over `rows` output rows.
fn thread_count(work: usize, rows: usize) -> usize {
    if work < PARALLEL_MIN_WORK || rows < 2 {
        return 1;
    }
    std::thread::available_parallelism().map(usize::from).unwrap_or(1).min(MAX_THREADS).min(rows)
}

/// Runs `f(first_row, chunk)` over `out` split into whole rows of `row_len` bytes, on up to
/// `threads` threads, with chunk sizes a multiple of `granule` rows. Each output row is
/// computed independently, so the split does not affect the result.
fn for_row_chunks<F>(out: &mut [u8], row_len: usize, granule: usize, threads: usize, f: F)
where
    F: Fn(usize, &mut [u8]) + Sync,
{
    if row_len == 0 || out.is_empty() {
        return;
    }
    let rows = out.len() / row_len;
    if threads <= 1 {
        f(0, out);
        return;
    }
    let rows_per = rows.div_ceil(threads).next_multiple_of(granule.max(1));
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(rows_per * row_len).enumerate() {
            let f = &f;
            s.spawn(move || f(i * rows_per, chunk));
        }
    });
}

/// Source rows the horizontal pass resamples together. The rows of a strip are interleaved
/// (`[x][row][channel]`) so that one output column of all of them is a contiguous
/// `STRIP * 3`-lane multiply-add per tap, which vectorises, instead of 3 scalar lanes.
const STRIP: usize = 8;
const LANES: usize = STRIP * 3;

/// Calls `$generic(args)` through an AVX2-enabled copy when the CPU has AVX2.
///
/// The crate is built for baseline x86-64 (SSE2, no 32-bit vector multiply), so without this
/// the vectorised loops would emulate `i32` multiplication. Results are identical either way:
/// it is the same integer arithmetic.
macro_rules! dispatch_avx2 {
    ($generic:ident, $avx2:ident, ($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: `$avx2` only differs from `$generic` by being compiled with AVX2
                // enabled, and the running CPU supports AVX2 (checked just above).
                return unsafe { $avx2($($arg),*) };
            }
        }
        $generic($($arg),*)
    }};
}

/// Horizontal pass over `out.len() / out_stride` output rows, reading source rows from
/// `first_src_row` on.
#[inline(always)]
fn horizontal_rows_generic(
    src: &[u8],
    in_stride: usize,
    first_src_row: usize,
    out: &mut [u8],
    out_stride: usize,
    c: &Coeffs,
) {
    let in_w = in_stride / 3;
    let mut strip = vec![0u8; in_w * LANES];
    for (s, out_strip) in out.chunks_mut(STRIP * out_stride).enumerate() {
        let rows = out_strip.len() / out_stride;
        let y0 = first_src_row + s * STRIP;
        // Interleave the strip's rows; rows past `rows` keep stale data and are not written out.
        for r in 0..rows {
            let row = &src[(y0 + r) * in_stride..(y0 + r + 1) * in_stride];
            for (px, dst) in row.chunks_exact(3).zip(strip.chunks_exact_mut(LANES)) {
                dst[r * 3..r * 3 + 3].copy_from_slice(px);
            }
        }
        let (cols, _) = strip.as_chunks::<LANES>();
        for xx in 0..out_stride / 3 {
            let (start, k) = c.taps(xx);
            let mut acc = [HALF; LANES];
            for (px, &w) in cols[start..start + k.len()].iter().zip(k) {
                for (a, &p) in acc.iter_mut().zip(px) {
                    *a += i32::from(p) * w;
                }
            }
            for r in 0..rows {
                let o = r * out_stride + xx * 3;
                out_strip[o] = clip8(acc[r * 3]);
                out_strip[o + 1] = clip8(acc[r * 3 + 1]);
                out_strip[o + 2] = clip8(acc[r * 3 + 2]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn horizontal_rows_avx2(
    src: &[u8],
    in_stride: usize,
    first_src_row: usize,
    out: &mut [u8],
    out_stride: usize,
    c: &Coeffs,
) {
    horizontal_rows_generic(src, in_stride, first_src_row, out, out_stride, c)
}

fn horizontal_rows(src: &[u8], in_stride: usize, first_src_row: usize, out: &mut [u8], out_stride: usize, c: &Coeffs) {
    dispatch_avx2!(horizontal_rows_generic, horizontal_rows_avx2, (src, in_stride, first_src_row, out, out_stride, c))
}

/// Horizontal pass: `src` rows `row_offset..row_offset + out_rows` resampled to `out_w`.
fn resample_horizontal(
    src: &[u8],
    src_w: usize,
    row_offset: usize,
    out_w: usize,
    out_rows: usize,
    c: &Coeffs,
) -> Vec<u8> {
    let in_stride = src_w * 3;
    let out_stride = out_w * 3;
    let mut out = vec![0u8; out_rows * out_stride];
    let taps: usize = c.bounds.iter().map(|b| b.1).sum();
    let threads = thread_count(taps * out_rows * 3, out_rows.div_ceil(STRIP));
    for_row_chunks(&mut out, out_stride, STRIP, threads, |first, chunk| {
        horizontal_rows(src, in_stride, row_offset + first, chunk, out_stride, c);
    });
    out
}

/// Vertical pass over `out.len() / stride` output rows starting at output row `first`:
/// every output row is a weighted sum of whole source rows, so the inner loop runs over
/// contiguous memory (and vectorises) instead of striding down columns.
#[inline(always)]
fn vertical_rows_generic(src: &[u8], stride: usize, first: usize, out: &mut [u8], c: &Coeffs) {
    let mut acc = vec![0i32; stride];
    for (r, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (start, k) = c.taps(first + r);
        acc.fill(HALF);
        for (i, &w) in k.iter().enumerate() {
            let row = &src[(start + i) * stride..(start + i + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * w;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(acc.iter()) {
            *o = clip8(a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn vertical_rows_avx2(src: &[u8], stride: usize, first: usize, out: &mut [u8], c: &Coeffs) {
    vertical_rows_generic(src, stride, first, out, c)
}

fn vertical_rows(src: &[u8], stride: usize, first: usize, out: &mut [u8], c: &Coeffs) {
    dispatch_avx2!(vertical_rows_generic, vertical_rows_avx2, (src, stride, first, out, c))
}

/// Vertical pass: `src` (rows of `width` pixels) resampled to `out_h` rows.
fn resample_vertical(src: &[u8], width: usize, out_h: usize, c: &Coeffs) -> Vec<u8> {
    let stride = width * 3;
    let mut out = vec![0u8; out_h * stride];
    let taps: usize = c.bounds.iter().map(|b| b.1).sum();
    let threads = thread_count(taps * stride, out_h);
    for_row_chunks(&mut out, stride, 1, threads, |first, chunk| {
        vertical_rows(src, stride, first, chunk, c);
    });
    out
}

/// Pillow 13's pass-order rule (`ImagingResampleInner`): when the height shrinks by more than
/// twice as many pixels as the width does, the vertical pass runs first (it makes the
/// horizontal pass cheaper). Earlier Pillow versions always ran the horizontal pass first;
/// the order can change a result by one level, so it has to match the Pillow in use.
fn horizontal_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    // Pillow computes this in C `int`; sizes here are far below overflow in i64.
    let dy = in_h as i64 - out_h as i64;
    let dx = in_w as i64 - out_w as i64;
    !(dy > 0 && dy > dx * 2)
}

/// Resizes an RGB image exactly like Pillow 13's `Image.resize((width, height), BICUBIC)`
/// (the default filter for RGB images, no `reducing_gap`).
///
/// Output bytes are identical to Pillow's. Resizing to the same size returns a copy, as
/// Pillow does. A zero target dimension, or an empty source, yields an empty image of the
/// requested size (Pillow would raise; callers here never ask for that).
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if out_w == 0 || out_h == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;
    let src: &[u8] = img.as_raw();

    let data = match (need_horizontal, need_vertical) {
        (false, false) => return img.clone(),
        (true, false) => {
            let horiz = precompute_coeffs(in_w, 0.0, in_w as f32, out_w);
            resample_horizontal(src, in_w, 0, out_w, in_h, &horiz)
        }
        (false, true) => {
            let vert = precompute_coeffs(in_h, 0.0, in_h as f32, out_h);
            resample_vertical(src, in_w, out_h, &vert)
        }
        (true, true) => {
            let horiz = precompute_coeffs(in_w, 0.0, in_w as f32, out_w);
            let mut vert = precompute_coeffs(in_h, 0.0, in_h as f32, out_h);
            if horizontal_first(in_w, in_h, out_w, out_h) {
                // Like Pillow, only the source rows the vertical pass reads are resampled.
                let first_row = vert.bounds[0].0;
                let last_row = vert.bounds[out_h - 1].0 + vert.bounds[out_h - 1].1;
                for b in &mut vert.bounds {
                    b.0 -= first_row;
                }
                let mid = resample_horizontal(src, in_w, first_row, out_w, last_row - first_row, &horiz);
                resample_vertical(&mid, out_w, out_h, &vert)
            } else {
                let mid = resample_vertical(src, in_w, out_h, &vert);
                resample_horizontal(&mid, in_w, 0, out_w, out_h, &horiz)
            }
        }
    };
    // The buffer length is out_w * out_h * 3 by construction, so this cannot fail; fall back
    // to an empty image rather than panicking if it ever did.
    RgbImage::from_raw(width, height, data).unwrap_or_else(|| RgbImage::new(width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for &(i, o) in &[(10usize, 448usize), (4000, 1792), (447, 448), (1, 448), (500, 1)] {
            let c = precompute_coeffs(i, 0.0, i as f32, o);
            assert_eq!(c.bounds.len(), o);
            for xx in 0..o {
                let (start, k) = c.taps(xx);
                assert!(start + k.len() <= i);
                let sum: i64 = k.iter().map(|&v| i64::from(v)).sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{i}->{o}");
            }
        }
    }

    #[test]
    fn same_size_is_copy_and_constant_stays_constant() {
        let img = RgbImage::from_fn(37, 23, |x, y| ::image::Rgb([x as u8, y as u8, 200]));
        assert_eq!(resize_bicubic(&img, 37, 23), img);
        let flat = RgbImage::from_pixel(333, 777, ::image::Rgb([10, 128, 255]));
        for &(w, h) in &[(448, 448), (1344, 896), (13, 5), (333, 900)] {
            let r = resize_bicubic(&flat, w, h);
            assert_eq!(r.dimensions(), (w, h));
            assert!(r.pixels().all(|p| p.0 == [10, 128, 255]));
        }
    }

    /// Straightforward per-pixel horizontal pass, as written in Pillow's C.
    fn naive_horizontal(src: &[u8], in_w: usize, rows: usize, out_w: usize, c: &Coeffs) -> Vec<u8> {
        let mut out = vec![0u8; rows * out_w * 3];
        for y in 0..rows {
            for xx in 0..out_w {
                let (start, k) = c.taps(xx);
                for ch in 0..3 {
                    let mut ss = HALF;
                    for (t, &w) in k.iter().enumerate() {
                        ss += i32::from(src[(y * in_w + start + t) * 3 + ch]) * w;
                    }
                    out[(y * out_w + xx) * 3 + ch] = clip8(ss);
                }
            }
        }
        out
    }

    #[test]
    fn vectorised_passes_match_naive_and_generic() {
        let (in_w, in_h) = (157usize, 93usize);
        let img = RgbImage::from_fn(in_w as u32, in_h as u32, |x, y| {
            let v = x.wrapping_mul(2_654_435_761).wrapping_add(y.wrapping_mul(40_503));
            ::image::Rgb([(v >> 3) as u8, (v >> 11) as u8, if (x + y) % 3 == 0 { 255 } else { 0 }])
        });
        let src = img.as_raw();
        for &(w, h) in &[(448usize, 448usize), (60, 200), (300, 40), (1, 1)] {
            let hc = precompute_coeffs(in_w, 0.0, in_w as f32, w);
            let expected = naive_horizontal(src, in_w, in_h, w, &hc);
            let mut generic = vec![0u8; in_h * w * 3];
            horizontal_rows_generic(src, in_w * 3, 0, &mut generic, w * 3, &hc);
            assert_eq!(generic, expected, "horizontal generic {w}");
            assert_eq!(resample_horizontal(src, in_w, 0, w, in_h, &hc), expected);

            let vc = precompute_coeffs(in_h, 0.0, in_h as f32, h);
            let mut generic = vec![0u8; h * in_w * 3];
            vertical_rows_generic(src, in_w * 3, 0, &mut generic, &vc);
            assert_eq!(resample_vertical(src, in_w, h, &vc), generic, "vertical {h}");
        }
    }

    #[test]
    fn known_pillow_values() {
        // Image.fromarray(np.arange(4*3*3, dtype=np.uint8).reshape(3, 4, 3) * 7).resize((7, 2))
        let img = RgbImage::from_raw(4, 3, (0..36u8).map(|v| v * 7).collect()).unwrap();
        let r = resize_bicubic(&img, 7, 2);
        let expected: [u8; 42] = [
            24, 31, 38, 32, 39, 46, 45, 52, 59, 58, 65, 72, 70, 77, 84, 83, 90, 97, 91, 98, 105, 140, 147, 154, 148,
            155, 162, 161, 168, 175, 174, 181, 188, 186, 193, 200, 199, 206, 213, 207, 214, 221,
        ];
        assert_eq!(r.as_raw().as_slice(), &expected[..]);
    }
}
