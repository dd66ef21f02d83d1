//! This crate's own CPU kernels, registered in ONNX Runtime as custom operators of domain
//! [`DOMAIN`]. Graphs that use them are written by the exporter next to the portable graph (see
//! `export/amx.py`) and opened only where the kernel can run, so a model folder stays usable anywhere.
//!
//! One kernel so far: [`OP_ATTENTION`], bf16 attention on Intel AMX for the vision encoder, a drop-in
//! for ONNX Runtime's fp32 `com.microsoft::MultiHeadAttention` (same inputs, same `num_heads`).

#[cfg(target_arch = "x86_64")]
mod amx_attention;

use std::cell::RefCell;
use std::sync::OnceLock;

use anyhow::{ensure, Result};
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

pub const DOMAIN: &str = "ai.internvl";
pub const OP_ATTENTION: &str = "AmxAttention";
/// The only head size the tiles are laid out for (InternViT-300M).
pub const AMX_HEAD_DIM: usize = 64;

/// Whether the AMX attention can run here: the CPU has AMX-BF16 with AVX512-BF16, and Linux granted
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
    OperatorDomain::new(DOMAIN)?.add(AmxAttention)
}

/// Shape of one attention call: `[batch, tokens, heads * head_dim]` for q, k, v and the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn from_dims(dims: &[i64], heads: usize) -> Result<Self> {
        ensure!(dims.len() == 3, "{OP_ATTENTION}: q is {dims:?}, expected [batch, tokens, hidden]");
        let (batch, tokens, hidden) = (dims[0] as usize, dims[1] as usize, dims[2] as usize);
        ensure!(heads > 0 && hidden % heads == 0, "{OP_ATTENTION}: hidden {hidden} not divisible by {heads} heads");
        Ok(Self { batch, tokens, heads, head_dim: hidden / heads })
    }

    fn len(&self) -> usize {
        self.batch * self.tokens * self.heads * self.head_dim
    }
}

/// softmax(q k^T * scale) v per (batch, head), on AMX in bf16; `run(tasks, f)` runs `f(0..tasks)`,
/// possibly in parallel (ONNX Runtime's thread pool inside a session, a plain loop in tests).
pub fn amx_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    shape: AttentionShape,
    scale: f32,
    run: impl FnOnce(usize, &(dyn Fn(usize) + Sync)) -> Result<()>,
) -> Result<()> {
    ensure!(amx_available(), "{OP_ATTENTION}: this CPU (or OS) has no AMX-BF16 tile support");
    ensure!(
        shape.head_dim == AMX_HEAD_DIM,
        "{OP_ATTENTION}: head size {} (only {AMX_HEAD_DIM} is supported)",
        shape.head_dim
    );
    let len = shape.len();
    ensure!(
        [q.len(), k.len(), v.len(), out.len()].iter().all(|&l| l == len),
        "{OP_ATTENTION}: q/k/v/out hold {}/{}/{}/{} floats, expected {len} for {shape:?}",
        q.len(),
        k.len(),
        v.len(),
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    {
        thread_local! {
            static SCRATCH: RefCell<amx_attention::Scratch> = RefCell::default();
        }
        let ld = shape.heads * shape.head_dim;
        // Raw addresses so the closure is Sync; tasks write disjoint (batch, head) column blocks.
        let (qp, kp, vp, op) =
            (q.as_ptr() as usize, k.as_ptr() as usize, v.as_ptr() as usize, out.as_mut_ptr() as usize);
        let task = move |i: usize| {
            let (b, h) = (i / shape.heads, i % shape.heads);
            let offset = b * shape.tokens * ld + h * shape.head_dim;
            let head = amx_attention::Head {
                q: (qp as *const f32).wrapping_add(offset),
                k: (kp as *const f32).wrapping_add(offset),
                v: (vp as *const f32).wrapping_add(offset),
                out: (op as *mut f32).wrapping_add(offset),
                ld,
                tokens: shape.tokens,
            };
            // SAFETY: AMX/AVX-512 support and the tile permission were checked above; the lengths were
            // checked against `shape`, so each head's rows lie inside the slices; heads do not overlap.
            SCRATCH.with(|s| unsafe { amx_attention::attention_head(head, scale, &mut s.borrow_mut()) });
        };
        run(shape.batch * shape.heads, &task)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (run, scale);
        unreachable!("amx_available() is false off x86_64")
    }
}

/// `ai.internvl::AmxAttention(q, k, v) -> out`, attribute `num_heads` (and optional `scale`, default
/// 1/sqrt(head_dim)): what `com.microsoft::MultiHeadAttention` computes with separate q, k, v and no mask.
pub struct AmxAttention;

pub struct AmxAttentionKernel {
    heads: usize,
    scale: Option<f32>,
}

impl Operator for AmxAttention {
    type Kernel<'attr> = AmxAttentionKernel;

    fn name(&self) -> &str {
        OP_ATTENTION
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [const { OperatorInput::required(TensorElementType::Float32) }; 3]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, ctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let heads = ctx
            .get::<i64>("num_heads")
            .filter(|&h| h > 0)
            .ok_or_else(|| ort::Error::new(format!("{OP_ATTENTION}: missing or invalid num_heads attribute")))?;
        Ok(AmxAttentionKernel { heads: heads as usize, scale: ctx.get::<f32>("scale").filter(|&s| s != 0.0) })
    }
}

impl Kernel for AmxAttentionKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let missing = |i: usize| ort::Error::new(format!("{OP_ATTENTION}: input {i} missing"));
        let (q, k, v) = (
            ctx.input(0)?.ok_or_else(|| missing(0))?,
            ctx.input(1)?.ok_or_else(|| missing(1))?,
            ctx.input(2)?.ok_or_else(|| missing(2))?,
        );
        let (dims, q) = q.try_extract_tensor::<f32>()?;
        let dims = dims.to_vec();
        let (_, k) = k.try_extract_tensor::<f32>()?;
        let (_, v) = v.try_extract_tensor::<f32>()?;
        let shape = AttentionShape::from_dims(&dims, self.heads).map_err(|e| ort::Error::new(e.to_string()))?;
        let scale = self.scale.unwrap_or(1.0 / (shape.head_dim as f32).sqrt());
        let mut out = ctx.output(0, dims)?.ok_or_else(|| ort::Error::new(format!("{OP_ATTENTION}: no output")))?;
        let (_, out) = out.try_extract_tensor_mut::<f32>()?;
        amx_attention(q, k, v, out, shape, scale, |tasks, f| {
            ctx.par_for(tasks, tasks, f).map_err(|e| anyhow::anyhow!("{e}"))
        })
        .map_err(|e| ort::Error::new(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16(x: f32) -> f64 {
        let b = x.to_bits();
        f32::from_bits(((b + 0x7fff + ((b >> 16) & 1)) >> 16) << 16) as f64
    }

    /// Exact attention in f64; with `emulate`, on the values the kernel sees: bf16 q*scale*log2(e), k, v and
    /// bf16 probabilities normalised by the unrounded sum.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape, scale: f32, emulate: bool) -> Vec<f64> {
        let (ld, d) = (s.heads * s.head_dim, s.head_dim);
        let round = |x: f32| if emulate { bf16(x) } else { x as f64 };
        let mut out = vec![0.0; s.len()];
        let log2e = std::f32::consts::LOG2_E;
        for b in 0..s.batch {
            for h in 0..s.heads {
                let at = |r: usize, c: usize| b * s.tokens * ld + r * ld + h * d + c;
                for i in 0..s.tokens {
                    let scores: Vec<f64> = (0..s.tokens)
                        .map(|j| (0..d).map(|c| round(q[at(i, c)] * scale * log2e) * round(k[at(j, c)])).sum())
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - max).exp2()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        let acc: f64 = (0..s.tokens).map(|j| round(e[j] as f32) * round(v[at(j, c)])).sum();
                        out[at(i, c)] = acc / sum;
                    }
                }
            }
        }
        out
    }

    fn random(len: usize, seed: u64, amplitude: f32) -> Vec<f32> {
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

    fn max_diff(got: &[f32], want: &[f64]) -> f64 {
        got.iter().zip(want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn amx_attention_matches_the_reference_for_every_tail() {
        if !amx_available() {
            // Not an AMX machine: the runtime never opens the AMX graph here (see pipeline tests).
            eprintln!("no AMX-BF16 on this CPU: kernel not exercised");
            return;
        }
        // Token counts around every tile edge (16 queries/keys, 32 keys) and InternViT's 1025.
        for (tokens, batch, heads) in
            [(1, 1, 1), (15, 2, 3), (16, 1, 2), (17, 1, 1), (32, 1, 1), (33, 2, 2), (100, 1, 2), (1025, 1, 1)]
        {
            let shape = AttentionShape { batch, tokens, heads, head_dim: AMX_HEAD_DIM };
            let seed = tokens as u64 * 31 + heads as u64;
            // Amplitudes like InternViT's: logits spanning tens, so the softmax is peaked and rounding shows.
            let (q, k, v) = (
                random(shape.len(), seed, 3.0),
                random(shape.len(), seed + 1, 3.0),
                random(shape.len(), seed + 2, 1.0),
            );
            let scale = 0.125;
            let mut out = vec![f32::NAN; shape.len()];
            amx_attention(&q, &k, &v, &mut out, shape, scale, |n, f| {
                (0..n).for_each(f);
                Ok(())
            })
            .unwrap();
            let same_inputs = max_diff(&out, &reference(&q, &k, &v, shape, scale, true));
            let exact = max_diff(&out, &reference(&q, &k, &v, shape, scale, false));
            // Same bf16 inputs: only fp32 accumulation order, the exp2 polynomial and the odd probability
            // rounded the other way differ (measured <= 8.5e-5); a layout or mask error is ~0.1.
            assert!(same_inputs < 5e-4, "tokens {tokens}: {same_inputs} from the bf16-input reference");
            // Against exact attention: the cost of bf16 (measured <= 1.0e-2 on these inputs).
            assert!(exact < 2e-2, "tokens {tokens}: {exact} from exact attention");
        }
    }

    #[test]
    fn amx_attention_rejects_other_shapes() {
        let shape = AttentionShape { batch: 1, tokens: 4, heads: 2, head_dim: 32 };
        let x = vec![0.0; shape.len()];
        let mut out = x.clone();
        let err = amx_attention(&x, &x, &x, &mut out, shape, 1.0, |_, _| Ok(())).unwrap_err().to_string();
        assert!(err.contains("head size 32") || err.contains("no AMX"), "{err}");
        let shape = AttentionShape { head_dim: 64, ..shape };
        let err = amx_attention(&x, &x, &x, &mut out, shape, 1.0, |_, _| Ok(())).unwrap_err().to_string();
        assert!(err.contains("expected 512") || err.contains("no AMX"), "{err}");
    }
}
