//! One head's attention on Intel AMX tiles in bf16 (softmax in fp32 AVX-512), full or causal over a
//! cached past, and the fp32 single-position form a decode step uses.
//!
//! Why by hand: ONNX Runtime's CPU attention (`MultiHeadAttention`) is fp32 only, and InternViT's
//! attention is ~0.1 TFLOP per 448x448 tile (1025 tokens, 24 layers) -- about 350 ms of a 640 ms int8
//! tile on 2 cores. The AMX units multiply bf16 at several times the fp32 rate, so the two matrix
//! products become cheap and what is left is the softmax over 1025 x 1025 scores, done here in one
//! pass per block of queries while the scores are still in cache.
//!
//! Per head and per block of queries (32 for 64-dim heads, 16 for 128): S = (Q * scale * log2 e) K^T
//! on tiles (fp32 accumulate),
//! P = 2^(S - rowmax) rounded to bf16, O = P V on tiles, O /= rowsum(P) in fp32. Q, K and V are read
//! in place (a head's rows inside a wider tensor or a KV cache) and packed per head: K^T and V into the VNNI
//! pair layout the B operand of `tdpbf16ps` wants. Precision: inputs and probabilities carry bf16's
//! 8-bit mantissa, everything accumulated in fp32 -- the same as PyTorch's bf16 attention.
//!
//! AMX instructions have no stable Rust intrinsics, so they are written as `asm!` (stable); the tile
//! registers are not allocated by the compiler, each block names the ones it uses.

use std::arch::asm;
use std::arch::x86_64::*;

/// `len` rows of one head's `D` floats, row `r` at `ptr + r * ld` (a head inside a wider tensor).
#[derive(Clone, Copy)]
pub struct Rows {
    pub ptr: *const f32,
    pub ld: usize,
    pub len: usize,
}

/// Where output rows go: row `r` at `ptr + r * ld`.
#[derive(Clone, Copy)]
pub struct RowsMut {
    pub ptr: *mut f32,
    pub ld: usize,
}

/// Per-thread working memory: the packed bf16 operands and the scores of 32 queries.
#[derive(Default)]
pub struct Scratch {
    q: Vec<u16>,
    kt: Vec<u16>,
    v: Vec<u16>,
    s: Vec<f32>,
    p: Vec<u16>,
    o: Vec<f32>,
}

impl Scratch {
    fn fit(&mut self, queries: usize, keys: usize, dim: usize) {
        let (q32, k32) = (queries.div_ceil(32) * 32, keys.div_ceil(32) * 32);
        self.q.resize(q32 * dim, 0);
        self.kt.resize(k32 * dim, 0);
        self.v.resize(k32 * dim, 0);
        self.s.resize(32 * k32, 0.0);
        self.p.resize(32 * k32, 0);
        self.o.resize(16 * dim, 0.0);
    }
}

/// The 64-byte tile configuration (`ldtilecfg`): palette, then bytes per row and rows of each tile.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

macro_rules! tile_load {
    ($t:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $ptr, s = in(reg) $stride,
             options(nostack, readonly))
    };
}
macro_rules! tile_store {
    ($t:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $ptr, s = in(reg) $stride, options(nostack))
    };
}
macro_rules! tile_zero {
    ($t:literal) => {
        asm!(concat!("tilezero tmm", $t), options(nostack, nomem))
    };
}
/// C (fp32 16x16) += A (bf16 16x32) * B (bf16 32x16 in VNNI pairs).
macro_rules! tile_dot {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b), options(nostack, nomem))
    };
}

/// softmax(q k^T * scale) v for one head of `D` = 64 or 128 dims, written as `q.len` rows at `out`.
/// With `causal = Some(past)`, query `i` sits at position `past + i` and sees keys `0..=past + i` only
/// (keys are positions `0..k.len`); without, every query sees every key.
///
/// # Safety
/// The CPU has AMX-BF16, AVX512-BF16 and AVX512F/BW and the process was granted the AMX tile state
/// (`super::amx_available`); `q`, `k`, `v` address their rows (`ld >= D`, `k.len == v.len`), and
/// `out` addresses `q.len` rows that overlap no input.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn attention<const D: usize>(
    q: Rows,
    k: Rows,
    v: Rows,
    causal: Option<usize>,
    out: RowsMut,
    scale: f32,
    sc: &mut Scratch,
) {
    const { assert!(D == 64 || D == 128) };
    let (n_q, n_k) = (q.len, k.len);
    if n_q == 0 || n_k == 0 {
        return;
    }
    sc.fit(n_q, n_k, D);
    pack_queries::<D>(q, scale * std::f32::consts::LOG2_E, sc);
    pack_keys::<D>(k, v, sc);

    // Palette 1 has 8 tiles; the entries of the other 8 must be zero or ldtilecfg faults.
    let mut config = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
    config.colsb[..8].fill(64);
    config.rows[..8].fill(16);
    asm!("ldtilecfg [{}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
    if D == 64 {
        blocks_64(n_q, n_k, causal, out, sc);
    } else {
        blocks_128(n_q, n_k, causal, out, sc);
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// The tile loops for 64-dim heads, queries in pairs of 16-row blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn blocks_64(n_q: usize, n_k: usize, causal: Option<usize>, out: RowsMut, sc: &mut Scratch) {
    const D: usize = 64;
    let k32 = n_k.div_ceil(32) * 32;
    let p_stride = k32 * 2;
    let mut sums = [0f32; 32];
    // Queries in pairs of 16-row blocks: each K^T tile loaded serves both (half the tile loads).
    for row0 in (0..n_q).step_by(32) {
        // Keys each row needs: all, or up to its own position.
        let seen = |r: usize| causal.map_or(n_k, |past| (past + row0 + r + 1).min(n_k));
        let key_blocks = seen(31).div_ceil(16);
        let width = key_blocks.div_ceil(2) * 32;
        // S = Q K^T: A tiles 2/3 and 4/5 hold the two blocks' queries (dims 0..32, 32..64).
        let qa = sc.q.as_ptr().add(row0 * D);
        tile_load!(2, qa, D * 2);
        tile_load!(3, qa.add(32), D * 2);
        tile_load!(4, qa.add(16 * D), D * 2);
        tile_load!(5, qa.add(16 * D + 32), D * 2);
        let s = sc.s.as_mut_ptr();
        for j in 0..key_blocks {
            let b = sc.kt.as_ptr().add(j * 1024);
            tile_zero!(0);
            tile_zero!(1);
            tile_load!(6, b, 64usize);
            tile_dot!(0, 2, 6);
            tile_dot!(1, 4, 6);
            tile_load!(7, b.add(512), 64usize);
            tile_dot!(0, 3, 7);
            tile_dot!(1, 5, 7);
            tile_store!(0, s.add(j * 256), 64usize);
            tile_store!(1, s.add(16 * k32 + j * 256), 64usize);
        }
        softmax_rows(sc, k32, &mut sums, seen, width);
        // O = P V per 16-row block: A tile 4 = 32 keys of probabilities, 4 accumulators = 64 output dims.
        for half in 0..2 {
            let first = row0 + 16 * half;
            if first >= n_q {
                break;
            }
            let o = sc.o.as_mut_ptr();
            pv_tiles(sc.p.as_ptr().add(16 * half * k32), p_stride, width / 32, sc.v.as_ptr(), 4, o, D * 4);
            store_rows::<D>(&sums[16 * half..][..(n_q - first).min(16)], o, out, first);
        }
    }
}

/// The tile loops for 128-dim heads: one 16-row block of queries holds four A tiles (dims 0..128).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn blocks_128(n_q: usize, n_k: usize, causal: Option<usize>, out: RowsMut, sc: &mut Scratch) {
    const D: usize = 128;
    let k32 = n_k.div_ceil(32) * 32;
    let p_stride = k32 * 2;
    let mut sums = [0f32; 16];
    for row0 in (0..n_q).step_by(16) {
        let seen = |r: usize| causal.map_or(n_k, |past| (past + row0 + r + 1).min(n_k));
        let key_blocks = seen(15).div_ceil(16);
        let width = key_blocks.div_ceil(2) * 32;
        let qa = sc.q.as_ptr().add(row0 * D);
        tile_load!(2, qa, D * 2);
        tile_load!(3, qa.add(32), D * 2);
        tile_load!(4, qa.add(64), D * 2);
        tile_load!(5, qa.add(96), D * 2);
        let s = sc.s.as_mut_ptr();
        for j in 0..key_blocks {
            let b = sc.kt.as_ptr().add(j * 4 * 512);
            tile_zero!(0);
            tile_load!(6, b, 64usize);
            tile_dot!(0, 2, 6);
            tile_load!(7, b.add(512), 64usize);
            tile_dot!(0, 3, 7);
            tile_load!(6, b.add(1024), 64usize);
            tile_dot!(0, 4, 6);
            tile_load!(7, b.add(1536), 64usize);
            tile_dot!(0, 5, 7);
            tile_store!(0, s.add(j * 256), 64usize);
        }
        softmax_rows(sc, k32, &mut sums, seen, width);
        // O = P V in two passes of 64 output dims (4 accumulators each).
        let o = sc.o.as_mut_ptr();
        for pass in 0..2 {
            let v = sc.v.as_ptr().add(pass * 4 * 512);
            pv_tiles(sc.p.as_ptr(), p_stride, width / 32, v, 8, o.add(pass * 64), D * 4);
        }
        store_rows::<D>(&sums[..(n_q - row0).min(16)], o, out, row0);
    }
}

/// O (16 rows x 64 dims, fp32) = P V over `chunks` of 32 keys: A = P's 16 x 32 bf16 tile of a chunk,
/// B = the chunk's four V tiles (`tiles_per_chunk` apart in the packed V: 4 for 64-dim heads, 8 for 128).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pv_tiles(
    p: *const u16,
    p_stride: usize,
    chunks: usize,
    v: *const u16,
    tiles_per_chunk: usize,
    o: *mut f32,
    o_stride: usize,
) {
    tile_zero!(0);
    tile_zero!(1);
    tile_zero!(2);
    tile_zero!(3);
    for t in 0..chunks {
        tile_load!(4, p.add(t * 32), p_stride);
        let b = v.add(t * tiles_per_chunk * 512);
        tile_load!(6, b, 64usize);
        tile_dot!(0, 4, 6);
        tile_load!(7, b.add(512), 64usize);
        tile_dot!(1, 4, 7);
        tile_load!(6, b.add(1024), 64usize);
        tile_dot!(2, 4, 6);
        tile_load!(7, b.add(1536), 64usize);
        tile_dot!(3, 4, 7);
    }
    tile_store!(0, o, o_stride);
    tile_store!(1, o.add(16), o_stride);
    tile_store!(2, o.add(32), o_stride);
    tile_store!(3, o.add(48), o_stride);
}

/// Softmax of the first `sums.len()` score rows into P (row `r` sees `seen(r)` keys, P zero to `width`).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn softmax_rows(sc: &mut Scratch, k32: usize, sums: &mut [f32], seen: impl Fn(usize) -> usize, width: usize) {
    for (r, sum) in sums.iter_mut().enumerate() {
        // S is stored tile by tile: rows 16 at a time, each 16-key chunk of a row 256 floats apart.
        let row = sc.s.as_ptr().add(r / 16 * 16 * k32 + r % 16 * 16);
        *sum = softmax_row(row, 256, sc.p.as_mut_ptr().add(r * k32), seen(r), width);
    }
}

/// Output rows `first..`: `o` (16 rows of `D`) divided by each row's softmax sum.
#[target_feature(enable = "avx512f")]
unsafe fn store_rows<const D: usize>(sums: &[f32], o: *const f32, out: RowsMut, first: usize) {
    for (r, sum) in sums.iter().enumerate() {
        let inv = _mm512_set1_ps(1.0 / sum);
        let dst = out.ptr.add((first + r) * out.ld);
        for c in (0..D).step_by(16) {
            _mm512_storeu_ps(dst.add(c), _mm512_mul_ps(_mm512_loadu_ps(o.add(r * D + c)), inv));
        }
    }
}

/// Q (times `scale`) as bf16 rows, zero-padded to a multiple of 32 rows.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_queries<const D: usize>(q: Rows, scale: f32, sc: &mut Scratch) {
    let scale = _mm512_set1_ps(scale);
    let dst = sc.q.as_mut_ptr() as *mut __m512i;
    for r in 0..q.len.div_ceil(32) * 32 {
        for c in 0..D / 32 {
            let v = if r < q.len {
                let src = q.ptr.add(r * q.ld + c * 32);
                bf16x32(_mm512_mul_ps(_mm512_loadu_ps(src), scale), _mm512_mul_ps(_mm512_loadu_ps(src.add(16)), scale))
            } else {
                _mm512_setzero_si512()
            };
            _mm512_storeu_si512(dst.add(r * D / 32 + c), v);
        }
    }
}

/// K^T and V as bf16 B-operand tiles, zero-padded: K^T tile (key block j, dims c*32..) holds
/// `[pair r][key][2]`, V tile (32 keys t, dims e*16..) holds `[pair r][dim][2]`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_keys<const D: usize>(k: Rows, v: Rows, sc: &mut Scratch) {
    let n = k.len;
    // One key's 32 dims are 16 bf16 pairs; pair r goes to row r (64 bytes apart) of the tile.
    let rows = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(16),
    );
    let kt = sc.kt.as_mut_ptr() as *mut i32;
    for key in 0..n.div_ceil(16) * 16 {
        for c in 0..D / 32 {
            let pairs = if key < n {
                let src = k.ptr.add(key * k.ld + c * 32);
                bf16x32(_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)))
            } else {
                _mm512_setzero_si512()
            };
            _mm512_i32scatter_epi32::<4>(kt.add(((key / 16) * (D / 32) + c) * 256 + key % 16), rows, pairs);
        }
    }
    // Rows 2r and 2r+1 of V interleaved element by element.
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
        16, 0,
    );
    let dst = sc.v.as_mut_ptr() as *mut __m512i;
    let row = |r: usize, c: usize| if r < n { _mm512_loadu_ps(v.ptr.add(r * v.ld + c)) } else { _mm512_setzero_ps() };
    for t in 0..n.div_ceil(32) {
        for r in 0..16 {
            for e in 0..D / 16 {
                let both = bf16x32(row(t * 32 + 2 * r, e * 16), row(t * 32 + 2 * r + 1, e * 16));
                _mm512_storeu_si512(dst.add((t * (D / 16) + e) * 16 + r), _mm512_permutexvar_epi16(interleave, both));
            }
        }
    }
}

/// One query position attending to all `k.len` keys of `16 * V` dims, for `q.len` query heads that share these keys
/// (grouped-query attention's decode step): each key and value row is read once for the whole group,
/// in fp32. `scores` is working memory.
///
/// # Safety
/// AVX512F; `q`, `k`, `v` address their rows (`k.len == v.len`), `out` addresses `q.len` rows that
/// overlap no input.
#[target_feature(enable = "avx512f")]
pub unsafe fn attention_one_position<const V: usize>(
    q: Rows,
    k: Rows,
    v: Rows,
    out: RowsMut,
    scale: f32,
    scores: &mut Vec<f32>,
) {
    let (heads, n) = (q.len, k.len);
    if heads == 0 || n == 0 {
        return;
    }
    scores.resize(heads * n, 0.0);
    let load = |p: *const f32| -> [__m512; V] { std::array::from_fn(|c| _mm512_loadu_ps(p.add(c * 16))) };
    let queries: Vec<[__m512; V]> = (0..heads)
        .map(|h| load(q.ptr.add(h * q.ld)).map(|x| _mm512_mul_ps(x, _mm512_set1_ps(scale * std::f32::consts::LOG2_E))))
        .collect();
    // Keys in blocks that stay in L1 while every head of the group goes over them: each cached row is
    // read from memory once per step.
    let dot = |qh: &[__m512; V], j: usize| {
        let key = load(k.ptr.add(j * k.ld));
        let mut acc = _mm512_mul_ps(qh[0], key[0]);
        for c in 1..V {
            acc = _mm512_fmadd_ps(qh[c], key[c], acc);
        }
        acc
    };
    for j0 in (0..n).step_by(KEY_BLOCK) {
        let end = (j0 + KEY_BLOCK).min(n);
        for (h, qh) in queries.iter().enumerate() {
            let row = scores.as_mut_ptr().add(h * n);
            let mut j = j0;
            while j + 16 <= end {
                let parts: [__m512; 16] = std::array::from_fn(|i| dot(qh, j + i));
                _mm512_storeu_ps(row.add(j), sum_lanes_16(parts));
                j += 16;
            }
            for j in j..end {
                *row.add(j) = _mm512_reduce_add_ps(dot(qh, j));
            }
        }
    }
    let mut sums = Vec::with_capacity(heads);
    for h in 0..heads {
        let row = scores.as_mut_ptr().add(h * n);
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in (0..n).step_by(16) {
            let m = if c + 16 <= n { 0xffff } else { ((1u32 << (n - c)) - 1) as u16 };
            max = _mm512_mask_max_ps(max, m, max, _mm512_maskz_loadu_ps(m, row.add(c)));
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
        let mut sum = _mm512_setzero_ps();
        for c in (0..n).step_by(16) {
            let m = if c + 16 <= n { 0xffff } else { ((1u32 << (n - c)) - 1) as u16 };
            let e = _mm512_maskz_mov_ps(m, exp2(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row.add(c)), max)));
            sum = _mm512_add_ps(sum, e);
            _mm512_mask_storeu_ps(row.add(c), m, e);
        }
        sums.push(_mm512_reduce_add_ps(sum));
    }
    let mut acc: Vec<[__m512; V]> = vec![[_mm512_setzero_ps(); V]; heads];
    for j0 in (0..n).step_by(KEY_BLOCK) {
        let end = (j0 + KEY_BLOCK).min(n);
        for (h, acc) in acc.iter_mut().enumerate() {
            let mut a = *acc; // in registers for the block
            for j in j0..end {
                let p = _mm512_set1_ps(*scores.get_unchecked(h * n + j));
                for (a, x) in a.iter_mut().zip(load(v.ptr.add(j * v.ld))) {
                    *a = _mm512_fmadd_ps(p, x, *a);
                }
            }
            *acc = a;
        }
    }
    for (h, a) in acc.iter().enumerate() {
        let inv = _mm512_set1_ps(1.0 / sums[h]);
        for (c, x) in a.iter().enumerate() {
            _mm512_storeu_ps(out.ptr.add(h * out.ld + c * 16), _mm512_mul_ps(*x, inv));
        }
    }
}

/// `p[..n32] = bf16(2^(s - max))` (zero past `n`); returns the fp32 sum of the unrounded values.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn softmax_row(s: *const f32, cs: usize, p: *mut u16, n: usize, n32: usize) -> f32 {
    let at = |c: usize| s.add(c / 16 * cs);
    let full = n / 16 * 16;
    let tail = ((1u32 << (n - full)) - 1) as u16;
    let (mut m0, mut m1) = (_mm512_set1_ps(f32::NEG_INFINITY), _mm512_set1_ps(f32::NEG_INFINITY));
    let mut c = 0;
    while c + 32 <= full {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(at(c)));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(at(c + 16)));
        c += 32;
    }
    if c < full {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(at(c)));
    }
    m0 = _mm512_mask_max_ps(m0, tail, m0, _mm512_maskz_loadu_ps(tail, at(full)));
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(m0, m1)));
    let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    c = 0;
    while c + 32 <= full {
        let e0 = exp2_for_bf16(_mm512_sub_ps(_mm512_loadu_ps(at(c)), max));
        let e1 = exp2_for_bf16(_mm512_sub_ps(_mm512_loadu_ps(at(c + 16)), max));
        s0 = _mm512_add_ps(s0, e0);
        s1 = _mm512_add_ps(s1, e1);
        _mm512_storeu_si512(p.add(c) as *mut __m512i, bf16x32(e0, e1));
        c += 32;
    }
    while c < n32 {
        let mask = if c + 16 <= full {
            0xffff
        } else if c == full {
            tail
        } else {
            0
        };
        let e = _mm512_maskz_mov_ps(mask, exp2_for_bf16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, at(c)), max)));
        s0 = _mm512_add_ps(s0, e);
        _mm256_storeu_si256(p.add(c) as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(e)));
        c += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
}

/// Keys per block of a decode step: 64 rows of K or V (16 / 32 KB) stay in L1 across a head group.
const KEY_BLOCK: usize = 64;

/// Lane `i` of the result = the sum of the 16 lanes of `v[i]` (a transpose-and-add tree: about 3
/// instructions per vector instead of a full horizontal reduction each).
#[target_feature(enable = "avx512f")]
unsafe fn sum_lanes_16(v: [__m512; 16]) -> __m512 {
    // Pairs: per 128-bit block [a0+a2, b0+b2, a1+a3, b1+b3].
    let pair = |a: __m512, b: __m512| _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    // Quads: per 128-bit block [sum a, sum b, sum c, sum d] over that block's 4 lanes.
    let quad = |x: __m512, y: __m512| _mm512_add_ps(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xEE>(x, y));
    let w: [__m512; 4] = std::array::from_fn(|i| quad(pair(v[4 * i], v[4 * i + 1]), pair(v[4 * i + 2], v[4 * i + 3])));
    // Blocks: add the four 128-bit blocks of each w and put w[i]'s sums in block i.
    let half =
        |a: __m512, b: __m512| _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
    let (u01, u23) = (half(w[0], w[1]), half(w[2], w[3]));
    _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(u01, u23), _mm512_shuffle_f32x4::<0xDD>(u01, u23))
}

/// 32 floats rounded to bf16 (nearest even), `lo` in the low half.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16x32(lo: __m512, hi: __m512) -> __m512i {
    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
}

/// 2^t for t <= 0: 2^round(t) * 2^f, f in [-0.5, 0.5] by its Taylor series to degree 5 (relative
/// error < 2e-6): the fp32 decode step.
#[target_feature(enable = "avx512f")]
unsafe fn exp2(t: __m512) -> __m512 {
    // Operand order: VMAXPS returns its second operand when either is NaN, so a NaN score stays NaN.
    let t = _mm512_max_ps(_mm512_set1_ps(-126.0), t);
    let n = _mm512_roundscale_ps::<0>(t);
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(1.333_355_8e-3);
    for c in [9.618_129e-3, 5.550_411e-2, 0.240_226_5, std::f32::consts::LN_2, 1.0] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// 2^t for probabilities that are rounded to bf16 next (relative step 2^-8): degree 3, fitted for
/// relative error on [-0.5, 0.5] (max 7.6e-5, 26x below bf16's rounding), no clamp (`scalef` takes any
/// exponent to 0 or infinity, NaN stays NaN). The softmax over 1025 x 1025 scores per head is most of
/// the vision attention's time, and this is most of the softmax.
#[target_feature(enable = "avx512f")]
unsafe fn exp2_for_bf16(t: __m512) -> __m512 {
    let n = _mm512_roundscale_ps::<0>(t);
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(5.517_027e-2);
    for c in [0.242_607_95, 0.693_260_9, 0.999_928_3] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}
