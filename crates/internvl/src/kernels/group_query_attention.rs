//! `ai.internvl::AmxGroupQueryAttention`: the decoder's grouped-query attention with rotary and the KV
//! cache, a drop-in for ONNX Runtime's `com.microsoft::GroupQueryAttention` as our decoder graphs use it.

use anyhow::{ensure, Result};
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

#[cfg(target_arch = "x86_64")]
use super::{amx, SCORES, SCRATCH};
use super::{amx_available, op_err, ort_parallel, AMX_HEAD_DIMS, OP_GQA};

/// One row of a call of grouped-query attention with a KV cache: `queries` new positions after `past`
/// cached ones; `heads` query heads share each of `kv_heads` key/value heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GqaShape {
    pub queries: usize,
    pub past: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Rows per head in the cache buffers (>= past + queries).
    pub capacity: usize,
}

/// What ONNX Runtime's `GroupQueryAttention` computes (rotary with non-interleaved halves, causal), with
/// the cache updated in place: rotates the new keys into `cache_k[:, past..]` (values into `cache_v`),
/// then attends -- on AMX tiles in bf16 for a prompt, in fp32 with each cached row read once per head
/// group for a single position. `q` is `[queries, heads * head_dim]`, `k` and `v` `[queries, kv_heads *
/// head_dim]`, caches `[kv_heads, capacity, head_dim]`, `cos` / `sin` `[>= past + queries, head_dim / 2]`.
#[allow(clippy::too_many_arguments)] // the operator's tensors, each named as ONNX Runtime names them
pub fn amx_group_query_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cache_k: &mut [f32],
    cache_v: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    out: &mut [f32],
    shape: GqaShape,
    scale: f32,
    run: impl FnOnce(usize, &(dyn Fn(usize) + Sync)) -> Result<()>,
) -> Result<()> {
    let GqaShape { queries, past, heads, kv_heads, head_dim: d, capacity } = shape;
    ensure!(amx_available(), "{OP_GQA}: this CPU (or OS) has no AMX-BF16 tile support");
    ensure!(AMX_HEAD_DIMS.contains(&d), "{OP_GQA}: head size {d} (supported: {AMX_HEAD_DIMS:?})");
    ensure!(kv_heads > 0 && heads % kv_heads == 0, "{OP_GQA}: {heads} heads do not group over {kv_heads} kv heads");
    let total = past + queries;
    ensure!(total <= capacity, "{OP_GQA}: {total} positions do not fit a cache of {capacity}");
    ensure!(
        q.len() == queries * heads * d
            && k.len() == queries * kv_heads * d
            && v.len() == k.len()
            && out.len() == q.len()
            && cache_k.len() == kv_heads * capacity * d
            && cache_v.len() == cache_k.len(),
        "{OP_GQA}: tensor sizes do not match {shape:?}"
    );
    let half = d / 2;
    ensure!(
        cos.len() >= total * half && sin.len() == cos.len(),
        "{OP_GQA}: rotary tables shorter than {total} positions"
    );
    let rotate = |x: &[f32], pos: usize, dst: &mut [f32]| {
        let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
        for j in 0..half {
            let (x1, x2) = (x[j], x[j + half]);
            dst[j] = x1 * c[j] - x2 * s[j];
            dst[j + half] = x2 * c[j] + x1 * s[j];
        }
    };
    let mut q_rot = vec![0f32; q.len()];
    for i in 0..queries {
        for h in 0..heads {
            let at = (i * heads + h) * d;
            rotate(&q[at..at + d], past + i, &mut q_rot[at..at + d]);
        }
        for g in 0..kv_heads {
            let (src, dst) = ((i * kv_heads + g) * d, (g * capacity + past + i) * d);
            rotate(&k[src..src + d], past + i, &mut cache_k[dst..dst + d]);
            cache_v[dst..dst + d].copy_from_slice(&v[src..src + d]);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        use amx::{Rows, RowsMut};
        let group = heads / kv_heads;
        let (qp, kp, vp, op) =
            (q_rot.as_ptr() as usize, cache_k.as_ptr() as usize, cache_v.as_ptr() as usize, out.as_mut_ptr() as usize);
        let cached =
            |p: usize, g: usize| Rows { ptr: (p as *const f32).wrapping_add(g * capacity * d), ld: d, len: total };
        if queries == 1 {
            // One task per head group: its cached rows are read once for all `group` heads.
            let task = move |g: usize| {
                let q = Rows { ptr: (qp as *const f32).wrapping_add(g * group * d), ld: d, len: group };
                let out = RowsMut { ptr: (op as *mut f32).wrapping_add(g * group * d), ld: d };
                // SAFETY: AVX-512 present (amx_available); sizes checked above; groups write disjoint rows.
                SCORES.with(|s| unsafe {
                    let (k, v, scores) = (cached(kp, g), cached(vp, g), &mut s.borrow_mut());
                    match d {
                        64 => amx::attention_one_position::<4>(q, k, v, out, scale, scores),
                        _ => amx::attention_one_position::<8>(q, k, v, out, scale, scores),
                    }
                });
            };
            run(kv_heads, &task)
        } else {
            let ld = heads * d;
            let task = move |h: usize| {
                let q = Rows { ptr: (qp as *const f32).wrapping_add(h * d), ld, len: queries };
                let out = RowsMut { ptr: (op as *mut f32).wrapping_add(h * d), ld };
                let g = h / group;
                // SAFETY: as above; heads write disjoint columns of `out`.
                SCRATCH.with(|s| unsafe {
                    let (k, v, sc) = (cached(kp, g), cached(vp, g), &mut s.borrow_mut());
                    match d {
                        64 => amx::attention::<64>(q, k, v, Some(past), out, scale, sc),
                        _ => amx::attention::<128>(q, k, v, Some(past), out, scale, sc),
                    }
                });
            };
            run(heads, &task)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (run, scale, q_rot);
        unreachable!("amx_available() is false off x86_64")
    }
}

/// `ai.internvl::AmxGroupQueryAttention`: a drop-in for `com.microsoft::GroupQueryAttention` as our
/// decoder graphs use it (any batch, each row at its own length, `do_rotary = 1`, non-interleaved, cos/sin caches given), inputs
/// `q, k, v, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache`, outputs
/// `out, present_key, present_value`. When the runtime binds the same buffer as past and present (see
/// `decoder.rs`), the new positions are written in place; otherwise the past is copied over first.
pub struct AmxGroupQueryAttention;

pub struct AmxGroupQueryAttentionKernel {
    heads: usize,
    kv_heads: usize,
    scale: Option<f32>,
}

impl Operator for AmxGroupQueryAttention {
    type Kernel<'attr> = AmxGroupQueryAttentionKernel;

    fn name(&self) -> &str {
        OP_GQA
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        use TensorElementType::{Float32, Int32};
        [Float32, Float32, Float32, Float32, Float32, Int32, Int32, Float32, Float32].map(OperatorInput::required)
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [const { OperatorOutput::required(TensorElementType::Float32) }; 3]
    }

    fn create_kernel<'attr>(&self, ctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let int = |name: &str| ctx.get::<i64>(name);
        let heads = int("num_heads").filter(|&h| h > 0);
        let kv_heads = int("kv_num_heads").filter(|&h| h > 0);
        let (Some(heads), Some(kv_heads)) = (heads, kv_heads) else {
            return Err(op_err(format!("{OP_GQA}: missing or invalid num_heads / kv_num_heads")));
        };
        if int("do_rotary") != Some(1) || int("rotary_interleaved").unwrap_or(0) != 0 {
            return Err(op_err(format!("{OP_GQA}: only do_rotary=1 with non-interleaved halves is implemented")));
        }
        let options = [("local_window_size", -1), ("smooth_softmax", 0), ("qk_output", 0)];
        if options.iter().any(|&(name, plain)| int(name).is_some_and(|v| v != plain))
            || ctx.get::<f32>("softcap").is_some_and(|c| c != 0.0)
        {
            return Err(op_err(format!(
                "{OP_GQA}: local windows, softcap, smooth softmax, qk output: not implemented"
            )));
        }
        Ok(AmxGroupQueryAttentionKernel {
            heads: heads as usize,
            kv_heads: kv_heads as usize,
            scale: ctx.get::<f32>("scale").filter(|&s| s != 0.0),
        })
    }
}

impl Kernel for AmxGroupQueryAttentionKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let input = |i: usize| ctx.input(i)?.ok_or_else(|| op_err(format!("{OP_GQA}: input {i} missing")));
        let (q, k, v) = (input(0)?, input(1)?, input(2)?);
        let (past_k, past_v, total, cos, sin) = (input(3)?, input(4)?, input(6)?, input(7)?, input(8)?);
        let seqlens = input(5)?;
        let (q_dims, q) = q.try_extract_tensor::<f32>()?;
        let (_, k) = k.try_extract_tensor::<f32>()?;
        let (_, v) = v.try_extract_tensor::<f32>()?;
        let (cos_dims, cos) = cos.try_extract_tensor::<f32>()?;
        let (_, sin) = sin.try_extract_tensor::<f32>()?;
        let total = total
            .try_extract_tensor::<i32>()?
            .1
            .first()
            .copied()
            .ok_or_else(|| op_err(format!("{OP_GQA}: empty total_sequence_length")))?;
        let (_, last_keys) = seqlens.try_extract_tensor::<i32>()?;
        let (past_dims, past_k) = past_k.try_extract_tensor::<f32>()?;
        let (past_v_dims, past_v) = past_v.try_extract_tensor::<f32>()?;
        if q_dims.len() != 3 || past_dims.len() != 4 || past_dims[0] != q_dims[0] {
            return Err(op_err(format!("{OP_GQA}: q {q_dims:?}, past {past_dims:?}: batch sizes differ")));
        }
        let (batch, queries, hidden) = (q_dims[0] as usize, q_dims[1] as usize, q_dims[2] as usize);
        let (buffer, d) = (past_dims[2] as usize, past_dims[3] as usize);
        if last_keys.len() != batch {
            return Err(op_err(format!("{OP_GQA}: {} seqlens_k for a batch of {batch}", last_keys.len())));
        }
        if past_dims[1] as usize != self.kv_heads || past_v_dims != past_dims || hidden != self.heads * d {
            return Err(op_err(format!(
                "{OP_GQA}: q {q_dims:?}, past key {past_dims:?}, past value {past_v_dims:?} do not fit {} heads / {} kv heads",
                self.heads, self.kv_heads
            )));
        }
        if cos_dims.last().copied() != Some(d as i64 / 2) {
            return Err(op_err(format!("{OP_GQA}: rotary tables {cos_dims:?} do not rotate all {d} dims")));
        }
        // Each row's past: its last key's index (from its mask) + 1 - the new positions (right padding, as
        // ONNX Runtime's kernel reads it); the rotary tables cover the widest row.
        let mut pasts = Vec::with_capacity(batch);
        for &last in last_keys {
            let past = usize::try_from(i64::from(last) + 1 - queries as i64)
                .ok()
                .filter(|&p| p <= buffer && p + queries <= total.max(0) as usize)
                .ok_or_else(|| {
                    op_err(format!(
                        "{OP_GQA}: seqlens_k {last} with {queries} new positions, total_sequence_length {total} and a past of {buffer}"
                    ))
                })?;
            pasts.push(past);
        }
        let widest = pasts.iter().map(|p| p + queries).max().unwrap_or(queries);
        let capacity = buffer.max(widest);
        let scale = self.scale.unwrap_or(1.0 / (d as f32).sqrt());
        // Raw addresses: the present buffers are usually the past ones (bound twice).
        let (past_k, past_v) = (past_k.as_ptr(), past_v.as_ptr());
        let present_dims = vec![batch as i64, self.kv_heads as i64, capacity as i64, d as i64];
        let mut present_k =
            ctx.output(1, present_dims.clone())?.ok_or_else(|| op_err(format!("{OP_GQA}: no present_key")))?;
        let mut present_v =
            ctx.output(2, present_dims)?.ok_or_else(|| op_err(format!("{OP_GQA}: no present_value")))?;
        let (_, cache_k) = present_k.try_extract_tensor_mut::<f32>()?;
        let (_, cache_v) = present_v.try_extract_tensor_mut::<f32>()?;
        let kv = self.kv_heads;
        for (src, dst) in [(past_k, &mut *cache_k), (past_v, &mut *cache_v)] {
            if src == dst.as_ptr() {
                continue;
            }
            for (b, &past) in pasts.iter().enumerate() {
                for g in 0..kv {
                    // SAFETY: past_key / past_value are [batch, kv_heads, buffer, d] (checked above) and
                    // `past <= buffer` rows per head are read; the present buffer is a different one.
                    let rows = unsafe { std::slice::from_raw_parts(src.add((b * kv + g) * buffer * d), past * d) };
                    dst[(b * kv + g) * capacity * d..][..past * d].copy_from_slice(rows);
                }
            }
        }
        let mut out = ctx.output(0, q_dims.to_vec())?.ok_or_else(|| op_err(format!("{OP_GQA}: no output")))?;
        let (_, out) = out.try_extract_tensor_mut::<f32>()?;
        let (q_row, kv_row, cache_row) = (queries * hidden, queries * kv * d, kv * capacity * d);
        for (b, &past) in pasts.iter().enumerate() {
            let shape = GqaShape { queries, past, heads: self.heads, kv_heads: kv, head_dim: d, capacity };
            amx_group_query_attention(
                &q[b * q_row..][..q_row],
                &k[b * kv_row..][..kv_row],
                &v[b * kv_row..][..kv_row],
                &mut cache_k[b * cache_row..][..cache_row],
                &mut cache_v[b * cache_row..][..cache_row],
                cos,
                sin,
                &mut out[b * q_row..][..q_row],
                shape,
                scale,
                ort_parallel(ctx),
            )
            .map_err(op_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;

    fn rotate(x: &[f32], pos: usize, cos: &[f32], sin: &[f32]) -> Vec<f32> {
        let half = x.len() / 2;
        let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
        (0..x.len())
            .map(|j| {
                if j < half {
                    x[j] * c[j] - x[j + half] * s[j]
                } else {
                    x[j] * c[j - half] + x[j - half] * s[j - half]
                }
            })
            .collect()
    }

    #[test]
    fn amx_group_query_attention_matches_the_reference() {
        if !amx_available() {
            eprintln!("no AMX-BF16 on this CPU: kernel not exercised");
            return;
        }
        for d in AMX_HEAD_DIMS {
            check_group_query_attention(d);
        }
    }

    fn check_group_query_attention(d: usize) {
        let (heads, kv_heads) = (6, 2);
        let group = heads / kv_heads;
        let rows_of = 400;
        let (cos, sin): (Vec<f32>, Vec<f32>) = (0..rows_of * d / 2)
            .map(|i| {
                let (pos, j) = ((i / (d / 2)) as f32, (i % (d / 2)) as f32);
                let angle = pos * 10000f32.powf(-2.0 * j / d as f32);
                (angle.cos(), angle.sin())
            })
            .unzip();
        // A decode step at several cache lengths, and prompts of every tail size, with and without a past.
        for (queries, past) in [(1, 0), (1, 37), (1, 300), (5, 0), (17, 20), (40, 100), (256, 3)] {
            let capacity = past + queries + 7;
            let shape = GqaShape { queries, past, heads, kv_heads, head_dim: d, capacity };
            let seed = (queries * 1000 + past) as u64;
            let q = random(queries * heads * d, seed, 3.0);
            let k = random(queries * kv_heads * d, seed + 1, 3.0);
            let v = random(queries * kv_heads * d, seed + 2, 1.0);
            let mut cache_k = random(kv_heads * capacity * d, seed + 3, 3.0);
            let mut cache_v = random(kv_heads * capacity * d, seed + 4, 1.0);
            let (old_k, old_v) = (cache_k.clone(), cache_v.clone());
            let mut out = vec![f32::NAN; q.len()];
            let scale = 1.0 / (d as f32).sqrt();
            amx_group_query_attention(
                &q,
                &k,
                &v,
                &mut cache_k,
                &mut cache_v,
                &cos,
                &sin,
                &mut out,
                shape,
                scale,
                |n, f| {
                    (0..n).for_each(f);
                    Ok(())
                },
            )
            .unwrap();
            let (mut worst_same, mut worst_exact) = (0f64, 0f64);
            for g in 0..kv_heads {
                let cached = |c: &[f32], r: usize| c[(g * capacity + r) * d..][..d].to_vec();
                // The cache: old rows kept, new rows = rotated keys / values, rows past the end untouched.
                for r in 0..capacity {
                    let (want_k, want_v) = if r >= past && r < past + queries {
                        let at = ((r - past) * kv_heads + g) * d;
                        (rotate(&k[at..at + d], r, &cos, &sin), v[at..at + d].to_vec())
                    } else {
                        (cached(&old_k, r), cached(&old_v, r))
                    };
                    assert_eq!(cached(&cache_k, r), want_k, "key row {r} (queries {queries}, past {past})");
                    assert_eq!(cached(&cache_v, r), want_v, "value row {r}");
                }
                let keys: Vec<Vec<f32>> = (0..past + queries).map(|r| cached(&cache_k, r)).collect();
                let values: Vec<Vec<f32>> = (0..past + queries).map(|r| cached(&cache_v, r)).collect();
                for h in g * group..(g + 1) * group {
                    let qh: Vec<Vec<f32>> =
                        (0..queries).map(|i| rotate(&q[(i * heads + h) * d..][..d], past + i, &cos, &sin)).collect();
                    let same = head_reference(&qh, &keys, &values, past, true, scale, queries > 1);
                    let exact = head_reference(&qh, &keys, &values, past, true, scale, false);
                    for i in 0..queries {
                        let got = &out[(i * heads + h) * d..][..d];
                        for c in 0..d {
                            worst_same = worst_same.max((got[c] as f64 - same[i][c]).abs());
                            worst_exact = worst_exact.max((got[c] as f64 - exact[i][c]).abs());
                        }
                    }
                }
            }
            // A decode step is fp32 throughout (exp2 polynomial and summation order only); a prompt runs
            // on bf16 tiles (same bound as the vision kernel); both within bf16's cost of exact attention.
            let bound = if queries == 1 { 1e-5 } else { 3e-3 };
            assert!(worst_same < bound, "d {d}, queries {queries}, past {past}: {worst_same} from the reference");
            assert!(worst_exact < 2e-2, "d {d}, queries {queries}, past {past}: {worst_exact} from exact attention");
        }
    }
}
