"""decoder.onnx: one LLM step with the KV cache as explicit tensors.

inputs:  inputs_embeds [batch, seq, hidden] f32,
         fused attention (GroupQueryAttention): seqlens_k [batch] i32 (each row's last key index after this
           call), total_sequence_length [] i32 (the longest row's length after this call);
         plain attention: attention_mask [batch, past+seq] i64 (1 = attend), position_ids [batch, seq] i64;
         past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] in the graph's type
         long_rope [1] i64 (LongRoPE models only: 1 = use the long factors for this call)
outputs: logits [batch, vocab] f32 (last position only: prefill never ships seq x vocab floats),
         present.{i}.key / .value [batch, kv_heads, past+seq, head_dim] in the graph's type

Fused graphs take GroupQueryAttention's lengths as inputs rather than computing them from a mask: the
kernel reads `total_sequence_length` on the host, so computing it on a GPU would cost a device-to-host
copy and a sync every step.

`dtype` float16 / bfloat16: weights, matmuls, attention, KV cache and rotary tables in that type; the
residual stream and every norm in fp32 (InternVL checkpoints are trained in bf16, whose range fp16
lacks: RMS of large activations overflows in fp16), `inputs_embeds` in and logits out in fp32 so the
host side stays f32.

The same graph serves prefill (past = 0) and decode (seq = 1). The forward pass is written here, over
the checkpoint's weights in canonical (transformers) names, rather than traced through transformers'
cache classes, which pin the query length or the past length when exported. One implementation covers
the families InternVL ships (they differ only in q/k/v bias and Qwen3's per-head q/k RMSNorm once
InternLM2's and Phi-3's packed projections are unpacked); the rotary frequencies are taken from transformers' own
rotary module, so every RoPE variant it knows comes for free. The self-check compares the graph with the
transformers model on a prefill and a decode step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import writer
from .common import TORCH_DTYPES, CheckpointError
from .vision import linear

# Logits: absolute 1e-3 plus 1e-5 of the largest logit (float32 rounding grows with the magnitude).
TOLERANCE = 1e-3
RTOL = 1e-5


@dataclass
class LlmSpec:
    arch: str  # transformers model_type of the reference: qwen2 | llama | qwen3 | phi3
    family: str  # what the checkpoint calls it: qwen2 | llama | qwen3 | internlm2 | phi3
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    vocab: int
    max_context: int


def _rms_norm(x, weight, eps):
    var = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(var + eps))


class FusedAttention(torch.autograd.Function):
    """ONNX Runtime's `com.microsoft::GroupQueryAttention` (rotary inside, causal, grouped K/V, cache in and
    out): one kernel instead of ~20 nodes per layer, and no [heads, q, kv] mask tensor per layer. The
    PyTorch side computes the same thing so the module still runs (and traces) outside ONNX."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total, cos_cache, sin_cache, heads, kv_heads, scale):
        if writer.tracing():  # the values are not needed (see writer.MatMul)
            b, s_len, _ = q.shape
            cat = (b, kv_heads, past_k.shape[2] + s_len, past_k.shape[-1])
            return torch.zeros_like(q), past_k.new_zeros(cat), past_v.new_zeros(cat)
        b, s_len, _ = q.shape
        d = past_k.shape[-1]
        start = past_k.shape[2]
        pos = torch.arange(start, start + s_len)
        cos = torch.cat((cos_cache[pos], cos_cache[pos]), -1)[None, None]
        sin = torch.cat((sin_cache[pos], sin_cache[pos]), -1)[None, None]
        q = q.view(b, s_len, heads, d).transpose(1, 2)
        k = k.view(b, s_len, kv_heads, d).transpose(1, 2)
        v = v.view(b, s_len, kv_heads, d).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)
        rep = heads // kv_heads
        scores = torch.matmul(q, k.repeat_interleave(rep, 1).transpose(-1, -2)) * scale
        mask = torch.arange(k.shape[2])[None, :] > pos[:, None]
        probs = torch.softmax(scores.masked_fill(mask, float("-inf")), -1)
        out = torch.matmul(probs, v.repeat_interleave(rep, 1)).transpose(1, 2).reshape(b, s_len, heads * d)
        return out, k, v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total, cos_cache, sin_cache, heads, kv_heads, scale):
        return g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total, cos_cache,
                    sin_cache, num_heads_i=heads, kv_num_heads_i=kv_heads, do_rotary_i=1, rotary_interleaved_i=0,
                    scale_f=scale, outputs=3)


class Decoder(nn.Module):
    """RMSNorm, RoPE, grouped-query attention (optional q/k/v bias, optional per-head q/k norm), SwiGLU.

    `fused`: attention as ONNX Runtime's GroupQueryAttention (its CPU kernel needs head_dim % 16 == 0);
    otherwise plain ONNX operators. Positions then come from the cache length inside the kernel, so the
    graph has no position_ids input (the runtime feeds it only to graphs that have it)."""

    def __init__(self, spec: LlmSpec, weights: writer.GraphWeights, rope: Rope, fused: bool = False,
                 trace: bool = False):
        super().__init__()
        self.spec = spec
        self.fused = fused
        self.rope = rope
        self.t = dtype = weights.dtype
        self.trace = trace
        if fused:
            # The tables in float64, rounded once: torch 2.15's float32 cos over this many elements was
            # measured to come out with ~3e-5 errors in some processes (sin never), enough to fail the check.
            pos = torch.arange(spec.max_context, dtype=torch.float64)[:, None]
            for name, inv in (("", rope.inv_freq), ("long_", rope.long_inv_freq)):
                if inv is not None:
                    freqs = pos * inv.float().double()[None]
                    self.register_buffer(name + "cos_cache", (freqs.cos() * rope.scale).to(dtype), persistent=False)
                    self.register_buffer(name + "sin_cache", (freqs.sin() * rope.scale).to(dtype), persistent=False)
        if trace:
            names = [n for n in weights.names() if (n.startswith("model.language_model.") or n == "lm_head.weight")
                     and writer.layer_of(n) < spec.layers]
            self.w = writer.parameters(names, weights)
        else:
            self.src = weights
        self.register_buffer("inv_freq", rope.inv_freq.detach().clone().float(), persistent=False)
        if rope.long_inv_freq is not None:
            self.register_buffer("long_inv_freq", rope.long_inv_freq.detach().clone().float(), persistent=False)
        self.rope_scale = float(rope.scale)

    def p(self, name: str):
        return self.w[name.replace(".", "__")] if self.trace else self.src[name]

    def opt(self, name: str):
        return self.w.get(name.replace(".", "__")) if self.trace else self.src.optional(name)

    def forward(self, inputs_embeds, attention_mask, position_ids, seqlens_k, total, long_rope, *past):
        s, t = self.spec, self.t
        h = inputs_embeds  # the residual stream stays fp32 whatever the graph's type
        if self.fused:
            cos_cache, sin_cache = self.cos_cache, self.sin_cache
            if long_rope is not None:
                # Only the rows in use are selected, so a step costs O(context), not O(max_context).
                n = total.to(torch.int64)
                use_long = long_rope.reshape(()) > 0
                cos_cache = torch.where(use_long, self.long_cos_cache[:n], self.cos_cache[:n])
                sin_cache = torch.where(use_long, self.long_sin_cache[:n], self.sin_cache[:n])
        else:
            # Causal + padding mask without shape arithmetic: a key at cache position p is visible to a query
            # at position q when p <= q and the key is not padding. Works for any past / seq length.
            key_pos = torch.cumsum(attention_mask, dim=-1) - 1  # [b, kv]
            visible = (key_pos[:, None, :] <= position_ids[:, :, None]) & (attention_mask[:, None, :] > 0)
            # Additive bias [b, 1, 1, q, kv], built once and broadcast over kv heads and group in every layer.
            bias = ((~visible[:, None, None]).to(torch.float32) * torch.finfo(t).min).to(t)
            inv_freq = self.inv_freq
            if long_rope is not None:
                inv_freq = torch.where(long_rope.reshape(()) > 0, self.long_inv_freq, self.inv_freq)
            freqs = position_ids[..., None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = (emb.cos()[:, None] * self.rope_scale).to(t)  # [b, 1, q, d]
            sin = (emb.sin()[:, None] * self.rope_scale).to(t)
        presents = []
        for i in range(s.layers):
            pre = f"model.language_model.layers.{i}."
            x = _rms_norm(h, self.p(pre + "input_layernorm.weight"), s.eps).to(t)
            b, q_len = x.shape[0], x.shape[1]

            def proj(name, heads, x=x, pre=pre, b=b, q_len=q_len):
                y = linear(x, self.p(f"{pre}self_attn.{name}.weight"), self.opt(f"{pre}self_attn.{name}.bias"))
                y = y.view(b, q_len, heads, s.head_dim)
                norm = self.opt(f"{pre}self_attn.{name[0]}_norm.weight")  # Qwen3: per-head RMSNorm before RoPE
                if norm is not None:
                    y = _rms_norm(y.float(), norm, s.eps).to(t)
                return y

            q, k, v = proj("q_proj", s.heads), proj("k_proj", s.kv_heads), proj("v_proj", s.kv_heads)
            if self.fused:
                ctx, k, v = FusedAttention.apply(
                    q.reshape(b, q_len, -1), k.reshape(b, q_len, -1), v.reshape(b, q_len, -1), past[2 * i],
                    past[2 * i + 1], seqlens_k, total, cos_cache, sin_cache, s.heads, s.kv_heads,
                    s.head_dim**-0.5)
                presents += [k, v]
            else:
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
                k = torch.cat((past[2 * i], k), dim=2)
                v = torch.cat((past[2 * i + 1], v), dim=2)
                presents += [k, v]
                # Grouped-query attention without repeating K/V: queries [b, kv_heads, group, q, d].
                qg = q.reshape(b, s.kv_heads, s.heads // s.kv_heads, q_len, s.head_dim)
                scores = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * (s.head_dim**-0.5) + bias
                probs = torch.softmax(scores, dim=-1)
                ctx = torch.matmul(probs, v[:, :, None])  # [b, kvh, g, q, d]
                ctx = ctx.reshape(b, s.heads, q_len, s.head_dim).transpose(1, 2).reshape(b, q_len, -1)
            attn = linear(ctx, self.p(pre + "self_attn.o_proj.weight"), self.opt(pre + "self_attn.o_proj.bias"))
            h = h + attn.float()
            x = _rms_norm(h, self.p(pre + "post_attention_layernorm.weight"), s.eps).to(t)
            gate = linear(x, self.p(pre + "mlp.gate_proj.weight"))
            up = linear(x, self.p(pre + "mlp.up_proj.weight"))
            h = h + linear(nn.functional.silu(gate) * up, self.p(pre + "mlp.down_proj.weight")).float()
        last = _rms_norm(h[:, -1, :], self.p("model.language_model.norm.weight"), s.eps).to(t)
        return (linear(last, self.p("lm_head.weight")).float(), *presents)


def keep_fp32(name: str) -> bool:
    """Norm weights stay fp32 in every graph type (the norms run in fp32)."""
    return "norm" in name.rsplit(".", 2)[-2]


def graph_weights(weights, dtype: str) -> writer.GraphWeights:
    return writer.GraphWeights(weights, TORCH_DTYPES[dtype], keep_fp32)


class _Graph(nn.Module):
    """The decoder with exactly the graph's inputs: fused attention takes the lengths (`seqlens_k`,
    `total_sequence_length`) and counts positions itself, plain attention the mask and position_ids;
    long_rope only for LongRoPE models."""

    def __init__(self, dec: Decoder, long_rope: bool):
        super().__init__()
        self.dec, self.long_rope = dec, long_rope

    def forward(self, inputs_embeds, a, b, *rest):
        mask, pos, seqlens, total = (None, None, a, b) if self.dec.fused else (a, b, None, None)
        flag = rest[0] if self.long_rope else None
        return self.dec(inputs_embeds, mask, pos, seqlens, total, flag, *(rest[1:] if self.long_rope else rest))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class Rope:
    """Rotary frequencies as transformers computes them (every RoPE variant it knows), plus LongRoPE's
    second set: transformers switches a whole forward call to the long factors when its last position
    passes `original_max_position_embeddings`; the graph gets that choice as its `long_rope` input."""

    inv_freq: torch.Tensor
    scale: float
    long_inv_freq: torch.Tensor | None = None
    long_after: int | None = None


def rope_of(model) -> Rope:
    rot = model.model.language_model.rotary_emb
    cfg = model.config.text_config
    params = getattr(cfg, "rope_parameters", None) or {}
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"LLM {cfg.model_type}: partial rotary embeddings are not supported")
    scale = float(getattr(rot, "attention_scaling", 1.0))
    if getattr(rot, "rope_type", "default") != "longrope":
        return Rope(rot.inv_freq, scale)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    after = int(params.get("original_max_position_embeddings") or cfg.original_max_position_embeddings)
    long_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=after + 1)
    return Rope(rot.original_inv_freq, scale, long_inv, after)


def io_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids", "seqlens_k", "total_sequence_length", "long_rope",
            *past], ["logits", *present]


def step_feed(have: set[str], embeds: np.ndarray, past: dict[str, np.ndarray], past_len: int,
              long_rope: int = 0) -> dict[str, np.ndarray]:
    """One call's inputs, for whichever of them the graph has: rows of equal length `past_len` (their
    cache in `past`) each given the positions in `embeds` [batch, seq, hidden]."""
    b, seq = embeds.shape[:2]
    total = past_len + seq
    feed = {"inputs_embeds": embeds.astype(np.float32), "attention_mask": np.ones((b, total), np.int64),
            "position_ids": np.arange(past_len, total, dtype=np.int64)[None].repeat(b, 0),
            "seqlens_k": np.full(b, total - 1, np.int32), "total_sequence_length": np.array(total, np.int32),
            "long_rope": np.array([long_rope], np.int64), **past}
    return {k: v for k, v in feed.items() if k in have}


def empty_past(layers: int, kv_heads: int, head_dim: int, dtype=np.float32, batch: int = 1) -> dict[str, np.ndarray]:
    empty = np.zeros((batch, kv_heads, 0, head_dim), dtype)
    return dict.fromkeys(io_names(layers)[0][6:], empty)


def graph_module(spec: LlmSpec, weights: writer.GraphWeights, rope: Rope, trace: bool = False) -> nn.Module:
    """The module the graph is traced from (`trace`) or that runs with the checkpoint's weights streamed,
    taking the graph's inputs in order."""
    return _Graph(Decoder(spec, weights, rope, can_fuse(spec), trace).eval(), rope.long_inv_freq is not None)


def can_fuse(spec: LlmSpec) -> bool:
    """ONNX Runtime's CPU GroupQueryAttention with rotary needs head_dim to be a multiple of 16."""
    return spec.head_dim % 16 == 0


def export_decoder(spec: LlmSpec, weights, rope: Rope, out: Path, dtype: str = "float32", quant=None,
                   seed: int = 0) -> dict:
    """The graph of `spec` (as many layers as it says) in `dtype`, weights from `weights` (`weights.Weights`),
    quantised by `quant` (`writer.Int8` / `writer.Int4`); checked by the caller (`check.py`)."""
    fused = can_fuse(spec)
    gw = graph_weights(weights, dtype)
    graph = graph_module(spec, gw, rope, trace=True)
    long_rope = graph.long_rope
    t = gw.dtype
    inputs, outputs = io_names(spec.layers)
    gen = torch.Generator().manual_seed(seed)
    batch, seq, past = 2, 3, 4
    embeds = torch.randn(batch, seq, spec.hidden, generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64)[None].repeat(batch, 1)
    seqlens = torch.full((batch,), past + seq - 1, dtype=torch.int32)
    total = torch.tensor(past + seq, dtype=torch.int32)
    pkv = [torch.randn(batch, spec.kv_heads, past, spec.head_dim, generator=gen).to(t) for _ in range(2 * spec.layers)]
    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "seqlens_k": {0: "batch"}, "logits": {0: "batch"}}
    axes.update({name: {0: "batch", 2: "past"} for name in inputs[6:]})
    axes.update({name: {0: "batch", 2: "total"} for name in outputs[1:]})
    args = [embeds, mask, pos, seqlens, total, torch.ones(1, dtype=torch.int64), *pkv]
    keep = [True, not fused, not fused, fused, fused, long_rope] + [True] * len(pkv)
    inputs = [n for n, k in zip(inputs, keep, strict=True) if k]
    args = tuple(a for a, k in zip(args, keep, strict=True) if k)
    axes = {k: v for k, v in axes.items() if k in inputs or k in outputs}
    figures = writer.write(graph, args, out, inputs, outputs, axes, gw, quant)
    return {
        "file": out.name, "arch": spec.family, "layers": spec.layers, "hidden": spec.hidden, "heads": spec.heads,
        "kv_heads": spec.kv_heads, "head_dim": spec.head_dim, "vocab": spec.vocab, "max_context": spec.max_context,
        "attention": "GroupQueryAttention" if fused else "onnx", "long_rope_after": rope.long_after,
        "dtype": dtype, "kv_dtype": dtype,
        "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": None if fused else "attention_mask",
                   "position_ids": None if fused else "position_ids",
                   "seqlens_k": "seqlens_k" if fused else None,
                   "total_sequence_length": "total_sequence_length" if fused else None,
                   "long_rope": "long_rope" if long_rope else None,
                   "past_key": "past_key_values.{}.key", "past_value": "past_key_values.{}.value"},
        "outputs": {"logits": "logits", "present_key": "present.{}.key", "present_value": "present.{}.value"},
        **({"quantization": figures} if figures else {}),
    }
