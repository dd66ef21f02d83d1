//! Full (non-causal) attention for one head on Intel AMX tiles in bf16, softmax in fp32 AVX-512.
//!
//! Why by hand: ONNX Runtime's CPU attention (`MultiHeadAttention`) is fp32 only, and InternViT's
//! attention is ~0.1 TFLOP per 448x448 tile (1025 tokens, 24 layers) -- about 350 ms of a 640 ms int8
//! tile on 2 cores. The AMX units multiply bf16 at several times the fp32 rate, so the two matrix
//! products become cheap and what is left is the softmax over 1025 x 1025 scores, done here in one
//! pass per 16-query block while the scores are still in cache.
//!
//! Per head and per block of 16 queries: S = (Q * scale * log2 e) K^T on tiles (fp32 accumulate),
//! P = 2^(S - rowmax) rounded to bf16, O = P V on tiles, O /= rowsum(P) in fp32. Q, K and V are read
//! from the graph's `[batch, tokens, heads * 64]` layout and packed per head: K^T and V into the VNNI
//! pair layout the B operand of `tdpbf16ps` wants. Precision: inputs and probabilities carry bf16's
//! 8-bit mantissa, everything accumulated in fp32 -- the same as PyTorch's bf16 attention.
//!
//! AMX instructions have no stable Rust intrinsics, so they are written as `asm!` (stable); the tile
//! registers are not allocated by the compiler, each block names the ones it uses.

use std::arch::asm;
use std::arch::x86_64::*;

/// Head dimension the tiles are laid out for (InternViT-300M: 1024 / 16 heads).
pub const HEAD_DIM: usize = 64;

/// Pointers to one head's rows: row `r` of Q starts at `q + r * ld` (same for k, v, out).
#[derive(Clone, Copy)]
pub struct Head {
    pub q: *const f32,
    pub k: *const f32,
    pub v: *const f32,
    pub out: *mut f32,
    pub ld: usize,
    pub tokens: usize,
}

/// Per-thread working memory: the packed bf16 operands and one block of scores.
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
    fn fit(&mut self, tokens: usize) {
        let n32 = tokens.div_ceil(32) * 32;
        for buf in [&mut self.q, &mut self.kt, &mut self.v] {
            buf.resize(n32 * HEAD_DIM, 0);
        }
        self.s.resize(16 * n32, 0.0);
        self.p.resize(16 * n32, 0);
        self.o.resize(16 * HEAD_DIM, 0.0);
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

/// Computes one head. Writes `tokens` rows of `HEAD_DIM` floats at `head.out`.
///
/// # Safety
/// The CPU has AMX-BF16, AVX512-BF16 and AVX512F/BW, the process was granted the AMX tile state
/// (see `super::amx_available`), and every pointer in `head` addresses `tokens` rows of `ld` floats
/// of which the first `HEAD_DIM` are this head's (`ld >= HEAD_DIM`); `out` rows do not overlap inputs.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn attention_head(head: Head, scale: f32, sc: &mut Scratch) {
    let n = head.tokens;
    if n == 0 {
        return;
    }
    sc.fit(n);
    let n32 = n.div_ceil(32) * 32;
    pack(head, scale * std::f32::consts::LOG2_E, sc);

    // Palette 1 has 8 tiles; the entries of the other 8 must be zero or ldtilecfg faults.
    let mut config = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
    config.colsb[..8].fill(64);
    config.rows[..8].fill(16);
    asm!("ldtilecfg [{}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
    let key_blocks = n.div_ceil(16);
    let s_stride = n32 * 4;
    let p_stride = n32 * 2;
    let mut sums = [0f32; 16];
    for block in 0..key_blocks {
        let row0 = block * 16;
        // S = Q K^T: A tiles 4/5 hold the block's queries (dims 0..32, 32..64), 4 accumulators.
        let qa = sc.q.as_ptr().add(row0 * HEAD_DIM);
        tile_load!(4, qa, HEAD_DIM * 2);
        tile_load!(5, qa.add(32), HEAD_DIM * 2);
        let s = sc.s.as_mut_ptr();
        let mut j = 0;
        while j + 4 <= key_blocks {
            let b = sc.kt.as_ptr().add(j * 1024);
            tile_zero!(0);
            tile_zero!(1);
            tile_zero!(2);
            tile_zero!(3);
            tile_load!(6, b, 64usize);
            tile_dot!(0, 4, 6);
            tile_load!(7, b.add(512), 64usize);
            tile_dot!(0, 5, 7);
            tile_load!(6, b.add(1024), 64usize);
            tile_dot!(1, 4, 6);
            tile_load!(7, b.add(1536), 64usize);
            tile_dot!(1, 5, 7);
            tile_load!(6, b.add(2048), 64usize);
            tile_dot!(2, 4, 6);
            tile_load!(7, b.add(2560), 64usize);
            tile_dot!(2, 5, 7);
            tile_load!(6, b.add(3072), 64usize);
            tile_dot!(3, 4, 6);
            tile_load!(7, b.add(3584), 64usize);
            tile_dot!(3, 5, 7);
            tile_store!(0, s.add(j * 16), s_stride);
            tile_store!(1, s.add(j * 16 + 16), s_stride);
            tile_store!(2, s.add(j * 16 + 32), s_stride);
            tile_store!(3, s.add(j * 16 + 48), s_stride);
            j += 4;
        }
        while j < key_blocks {
            let b = sc.kt.as_ptr().add(j * 1024);
            tile_zero!(0);
            tile_load!(6, b, 64usize);
            tile_dot!(0, 4, 6);
            tile_load!(7, b.add(512), 64usize);
            tile_dot!(0, 5, 7);
            tile_store!(0, s.add(j * 16), s_stride);
            j += 1;
        }
        for (r, sum) in sums.iter_mut().enumerate() {
            *sum = softmax_row(sc.s.as_ptr().add(r * n32), sc.p.as_mut_ptr().add(r * n32), n, n32);
        }
        // O = P V: A tile 4 = 32 keys of the block's probabilities, 4 accumulators = 64 output dims.
        tile_zero!(0);
        tile_zero!(1);
        tile_zero!(2);
        tile_zero!(3);
        let p = sc.p.as_ptr();
        for t in 0..n32 / 32 {
            tile_load!(4, p.add(t * 32), p_stride);
            let b = sc.v.as_ptr().add(t * 2048);
            tile_load!(6, b, 64usize);
            tile_dot!(0, 4, 6);
            tile_load!(7, b.add(512), 64usize);
            tile_dot!(1, 4, 7);
            tile_load!(6, b.add(1024), 64usize);
            tile_dot!(2, 4, 6);
            tile_load!(7, b.add(1536), 64usize);
            tile_dot!(3, 4, 7);
        }
        let o = sc.o.as_mut_ptr();
        tile_store!(0, o, HEAD_DIM * 4);
        tile_store!(1, o.add(16), HEAD_DIM * 4);
        tile_store!(2, o.add(32), HEAD_DIM * 4);
        tile_store!(3, o.add(48), HEAD_DIM * 4);
        for (r, sum) in sums.iter().enumerate().take(n - row0) {
            let inv = _mm512_set1_ps(1.0 / sum);
            let dst = head.out.add((row0 + r) * head.ld);
            for c in (0..HEAD_DIM).step_by(16) {
                _mm512_storeu_ps(dst.add(c), _mm512_mul_ps(_mm512_loadu_ps(o.add(r * HEAD_DIM + c)), inv));
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// bf16 operands, zero-padded to whole tiles: Q (scaled) row-major; K^T as tiles (key block j, dims
/// c*32..) holding `[pair r][key][2]`; V as tiles (32 keys t, dims e*16..) holding `[pair r][dim][2]`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack(head: Head, scale: f32, sc: &mut Scratch) {
    let (n, ld) = (head.tokens, head.ld);
    let n32 = n.div_ceil(32) * 32;
    let scale = _mm512_set1_ps(scale);
    let q = sc.q.as_mut_ptr() as *mut __m512i;
    for r in 0..n32 {
        for c in 0..2 {
            let v = if r < n {
                let src = head.q.add(r * ld + c * 32);
                bf16x32(_mm512_mul_ps(_mm512_loadu_ps(src), scale), _mm512_mul_ps(_mm512_loadu_ps(src.add(16)), scale))
            } else {
                _mm512_setzero_si512()
            };
            _mm512_storeu_si512(q.add(r * 2 + c), v);
        }
    }
    // One key's 32 dims are 16 bf16 pairs; pair r goes to row r (64 bytes apart) of the tile.
    let rows = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(16),
    );
    let kt = sc.kt.as_mut_ptr() as *mut i32;
    for key in 0..n.div_ceil(16) * 16 {
        for c in 0..2 {
            let pairs = if key < n {
                let src = head.k.add(key * ld + c * 32);
                bf16x32(_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)))
            } else {
                _mm512_setzero_si512()
            };
            _mm512_i32scatter_epi32::<4>(kt.add(((key / 16) * 2 + c) * 256 + key % 16), rows, pairs);
        }
    }
    // Rows 2r and 2r+1 of V interleaved element by element.
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
        16, 0,
    );
    let v = sc.v.as_mut_ptr() as *mut __m512i;
    let row = |r: usize, c: usize| if r < n { _mm512_loadu_ps(head.v.add(r * ld + c)) } else { _mm512_setzero_ps() };
    for t in 0..n32 / 32 {
        for r in 0..16 {
            for e in 0..4 {
                let both = bf16x32(row(t * 32 + 2 * r, e * 16), row(t * 32 + 2 * r + 1, e * 16));
                _mm512_storeu_si512(v.add((t * 4 + e) * 16 + r), _mm512_permutexvar_epi16(interleave, both));
            }
        }
    }
}

/// `p[..n32] = bf16(2^(s - max))` (zero past `n`); returns the fp32 sum of the unrounded values.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn softmax_row(s: *const f32, p: *mut u16, n: usize, n32: usize) -> f32 {
    let full = n / 16 * 16;
    let tail = ((1u32 << (n - full)) - 1) as u16;
    let (mut m0, mut m1) = (_mm512_set1_ps(f32::NEG_INFINITY), _mm512_set1_ps(f32::NEG_INFINITY));
    let mut c = 0;
    while c + 32 <= full {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s.add(c)));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s.add(c + 16)));
        c += 32;
    }
    if c < full {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s.add(c)));
    }
    m0 = _mm512_mask_max_ps(m0, tail, m0, _mm512_maskz_loadu_ps(tail, s.add(full)));
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(m0, m1)));
    let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    c = 0;
    while c + 32 <= full {
        let e0 = exp2(_mm512_sub_ps(_mm512_loadu_ps(s.add(c)), max));
        let e1 = exp2(_mm512_sub_ps(_mm512_loadu_ps(s.add(c + 16)), max));
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
        let e = _mm512_maskz_mov_ps(mask, exp2(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s.add(c)), max)));
        s0 = _mm512_add_ps(s0, e);
        _mm256_storeu_si256(p.add(c) as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(e)));
        c += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
}

/// 32 floats rounded to bf16 (nearest even), `lo` in the low half.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16x32(lo: __m512, hi: __m512) -> __m512i {
    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
}

/// 2^t for t <= 0: 2^round(t) * 2^f, f in [-0.5, 0.5] by its Taylor series to degree 5 (relative
/// error < 2e-6, far below the bf16 rounding that follows).
#[target_feature(enable = "avx512f")]
unsafe fn exp2(t: __m512) -> __m512 {
    let t = _mm512_max_ps(t, _mm512_set1_ps(-126.0));
    let n = _mm512_roundscale_ps::<0>(t);
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(1.333_355_8e-3);
    for c in [9.618_129e-3, 5.550_411e-2, 0.240_226_5, std::f32::consts::LN_2, 1.0] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}
