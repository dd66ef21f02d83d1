//! `ai.internvl::AmxAttention`: the vision encoder's full (non-causal) attention on AMX tiles, a drop-in
//! for ONNX Runtime's fp32 `com.microsoft::MultiHeadAttention` with separate q, k, v and no mask.

use anyhow::{ensure, Result};
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

#[cfg(target_arch = "x86_64")]
use super::{amx, SCRATCH};
use super::{amx_available, op_err, ort_parallel, AMX_HEAD_DIMS, OP_ATTENTION};

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
        AMX_HEAD_DIMS.contains(&shape.head_dim),
        "{OP_ATTENTION}: head size {} (supported: {AMX_HEAD_DIMS:?})",
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
        let ld = shape.heads * shape.head_dim;
        // Raw addresses so the closure is Sync; tasks write disjoint (batch, head) column blocks.
        let (qp, kp, vp, op) =
            (q.as_ptr() as usize, k.as_ptr() as usize, v.as_ptr() as usize, out.as_mut_ptr() as usize);
        let task = move |i: usize| {
            let (b, h) = (i / shape.heads, i % shape.heads);
            let offset = b * shape.tokens * ld + h * shape.head_dim;
            let rows = |p: usize| amx::Rows { ptr: (p as *const f32).wrapping_add(offset), ld, len: shape.tokens };
            let out = amx::RowsMut { ptr: (op as *mut f32).wrapping_add(offset), ld };
            // SAFETY: AMX/AVX-512 support and the tile permission were checked above; the lengths were
            // checked against `shape`, so each head's rows lie inside the slices; heads do not overlap.
            SCRATCH.with(|s| unsafe {
                let (q, k, v, sc) = (rows(qp), rows(kp), rows(vp), &mut s.borrow_mut());
                match shape.head_dim {
                    64 => amx::attention::<64>(q, k, v, None, out, scale, sc),
                    _ => amx::attention::<128>(q, k, v, None, out, scale, sc),
                }
            });
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
            .ok_or_else(|| op_err(format!("{OP_ATTENTION}: missing or invalid num_heads attribute")))?;
        Ok(AmxAttentionKernel { heads: heads as usize, scale: ctx.get::<f32>("scale").filter(|&s| s != 0.0) })
    }
}

impl Kernel for AmxAttentionKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let missing = |i: usize| op_err(format!("{OP_ATTENTION}: input {i} missing"));
        let (q, k, v) = (
            ctx.input(0)?.ok_or_else(|| missing(0))?,
            ctx.input(1)?.ok_or_else(|| missing(1))?,
            ctx.input(2)?.ok_or_else(|| missing(2))?,
        );
        let (dims, q) = q.try_extract_tensor::<f32>()?;
        let dims = dims.to_vec();
        let (k_dims, k) = k.try_extract_tensor::<f32>()?;
        let (v_dims, v) = v.try_extract_tensor::<f32>()?;
        if **k_dims != *dims || **v_dims != *dims {
            return Err(op_err(format!(
                "{OP_ATTENTION}: q {dims:?}, k {k_dims:?}, v {v_dims:?}: all must be [batch, tokens, hidden]"
            )));
        }
        let shape = AttentionShape::from_dims(&dims, self.heads).map_err(op_err)?;
        let scale = self.scale.unwrap_or(1.0 / (shape.head_dim as f32).sqrt());
        let mut out = ctx.output(0, dims)?.ok_or_else(|| op_err(format!("{OP_ATTENTION}: no output")))?;
        let (_, out) = out.try_extract_tensor_mut::<f32>()?;
        amx_attention(q, k, v, out, shape, scale, ort_parallel(ctx)).map_err(op_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;

    /// [`head_reference`] for each (batch, head) of `[batch, tokens, heads * head_dim]` tensors.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape, scale: f32, emulate: bool) -> Vec<f64> {
        let (ld, d) = (s.heads * s.head_dim, s.head_dim);
        let mut out = vec![0.0; s.len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let rows = |x: &[f32]| -> Vec<Vec<f32>> {
                    (0..s.tokens).map(|r| x[b * s.tokens * ld + r * ld + h * d..][..d].to_vec()).collect()
                };
                for (r, row) in
                    head_reference(&rows(q), &rows(k), &rows(v), 0, false, scale, emulate).iter().enumerate()
                {
                    for (c, x) in row.iter().enumerate() {
                        out[b * s.tokens * ld + r * ld + h * d + c] = *x;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn amx_attention_matches_the_reference_for_every_tail() {
        if !amx_available() {
            // Not an AMX machine: the runtime never opens the AMX graph here (see pipeline tests).
            eprintln!("no AMX-BF16 on this CPU: kernel not exercised");
            return;
        }
        // Token counts around every tile edge (16 queries/keys, 32 keys) and InternViT's 1025, both head sizes.
        let cases = [(1, 1, 1), (15, 2, 3), (16, 1, 2), (17, 1, 1), (32, 1, 1), (33, 2, 2), (100, 1, 2), (1025, 1, 1)];
        for ((tokens, batch, heads), head_dim) in cases.into_iter().flat_map(|c| AMX_HEAD_DIMS.map(|d| (c, d))) {
            let shape = AttentionShape { batch, tokens, heads, head_dim };
            let seed = tokens as u64 * 31 + heads as u64 + head_dim as u64;
            // Amplitudes like InternViT's: logits spanning tens, so the softmax is peaked and rounding shows.
            let (q, k, v) = (
                random(shape.len(), seed, 3.0),
                random(shape.len(), seed + 1, 3.0),
                random(shape.len(), seed + 2, 1.0),
            );
            let scale = 1.0 / (head_dim as f32).sqrt();
            let mut out = vec![f32::NAN; shape.len()];
            amx_attention(&q, &k, &v, &mut out, shape, scale, |n, f| {
                (0..n).for_each(f);
                Ok(())
            })
            .unwrap();
            let same_inputs = max_diff(&out, &reference(&q, &k, &v, shape, scale, true));
            let exact = max_diff(&out, &reference(&q, &k, &v, shape, scale, false));
            // Same bf16 inputs: only fp32 accumulation order, the exp2 polynomial and the odd probability
            // rounded to bf16 the other way (one flip moves an output by up to 2^-8) differ: measured
            // <= 8.5e-5 (64) / 5.9e-4 (128); a layout or mask error is ~0.1.
            let what = format!("{tokens} tokens, head size {head_dim}");
            assert!(same_inputs < 3e-3, "{what}: {same_inputs} from the bf16-input reference");
            // Against exact attention: the cost of bf16 (measured <= 1.0e-2 on these inputs).
            assert!(exact < 2e-2, "{what}: {exact} from exact attention");
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
