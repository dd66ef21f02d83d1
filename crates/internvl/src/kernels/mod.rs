//! This crate's own CPU kernels, registered in ONNX Runtime as custom operators of domain [`DOMAIN`].
//! Graphs that use them are written by the exporter next to the portable graphs (`export/amx.py`) and
//! opened only where the kernels can run, so a model folder stays usable anywhere.
//!
//! - [`attention`]: `AmxAttention`, the vision encoder's attention (for `MultiHeadAttention`).
//! - [`group_query_attention`]: `AmxGroupQueryAttention`, the decoder's (for `GroupQueryAttention`).
//!
//! Both run on Intel AMX tiles in bf16 (`amx`, the unsafe part), because ONNX Runtime's CPU
//! attention is fp32 only.

#[cfg(target_arch = "x86_64")]
mod amx;
pub mod attention;
pub mod group_query_attention;

use std::cell::RefCell;
use std::sync::OnceLock;

use ort::operator::{ComputeContext, OperatorDomain};

pub use attention::{amx_attention, AmxAttention, AttentionShape};
pub use group_query_attention::{amx_group_query_attention, AmxGroupQueryAttention, GqaShape};

pub const DOMAIN: &str = "ai.internvl";
pub const OP_ATTENTION: &str = "AmxAttention";
pub const OP_GQA: &str = "AmxGroupQueryAttention";
/// Head sizes the tile layouts exist for: 64 (InternViT-300M, Qwen2.5-0.5B), 128 (InternViT-6B and
/// the LLMs of InternVL 2B-8B: InternLM2.5, Qwen2.5-1.5B / 3B / 7B).
pub const AMX_HEAD_DIMS: [usize; 2] = [64, 128];

/// Whether the AMX kernels can run here: the CPU has AMX-BF16 with AVX512-BF16, and Linux granted
/// this process the AMX tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked once).
pub fn amx_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // CPUID.(7,0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE (no stable `is_x86_feature_detected` name yet).
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    let amx = edx & (1 << 22) != 0 && edx & (1 << 24) != 0;
    let avx = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16");
    amx && avx && unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// The custom operator domain to register on sessions that open a graph using these kernels.
pub fn domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?.add(AmxAttention)?.add(AmxGroupQueryAttention)
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    static SCRATCH: RefCell<amx::Scratch> = RefCell::default();
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Work split for the kernels inside a session: ONNX Runtime's intra-op thread pool.
fn ort_parallel(ctx: &ComputeContext) -> impl FnOnce(usize, &(dyn Fn(usize) + Sync)) -> anyhow::Result<()> + '_ {
    |tasks, f| ctx.par_for(tasks, tasks, f).map_err(|e| anyhow::anyhow!("{e}"))
}

fn op_err(e: impl std::fmt::Display) -> ort::Error {
    ort::Error::new(e.to_string())
}

#[cfg(test)]
mod testing {
    pub fn bf16(x: f32) -> f64 {
        let b = x.to_bits();
        f32::from_bits(((b + 0x7fff + ((b >> 16) & 1)) >> 16) << 16) as f64
    }

    /// One head's attention in f64: `q` rows at positions `past..`, keys `0..k.len()`, query `i` sees
    /// keys `0..=past + i` when `causal`. With `emulate`, on the values the AMX kernel sees: bf16
    /// q*scale*log2(e), k, v and bf16 probabilities normalised by the unrounded sum.
    pub fn head_reference(
        q: &[Vec<f32>],
        k: &[Vec<f32>],
        v: &[Vec<f32>],
        past: usize,
        causal: bool,
        scale: f32,
        emulate: bool,
    ) -> Vec<Vec<f64>> {
        let round = |x: f32| if emulate { bf16(x) } else { x as f64 };
        let log2e = std::f32::consts::LOG2_E;
        q.iter()
            .enumerate()
            .map(|(i, qi)| {
                let seen = if causal { past + i + 1 } else { k.len() };
                let scores: Vec<f64> = k[..seen]
                    .iter()
                    .map(|kj| qi.iter().zip(kj).map(|(a, b)| round(a * scale * log2e) * round(*b)).sum())
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp2()).collect();
                let sum: f64 = e.iter().sum();
                (0..qi.len())
                    .map(|c| (0..seen).map(|j| round(e[j] as f32) * round(v[j][c])).sum::<f64>() / sum)
                    .collect()
            })
            .collect()
    }

    pub fn random(len: usize, seed: u64, amplitude: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amplitude
            })
            .collect()
    }

    pub fn max_diff(got: &[f32], want: &[f64]) -> f64 {
        got.iter().zip(want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max)
    }
}
