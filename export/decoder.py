"""decoder.onnx: one LLM step with the KV cache as explicit tensors.

inputs:  inputs_embeds [batch, seq, hidden] f32, attention_mask [batch, past+seq] i64 (1 = attend),
         position_ids [batch, seq] i64, past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
outputs: logits [batch, vocab] (last position only: prefill never ships seq x vocab floats),
         present.{i}.key / .value [batch, kv_heads, past+seq, head_dim]

The same graph serves prefill (past = 0) and decode (seq = 1). The forward pass is written here, over
the checkpoint's weights in canonical (transformers) names, rather than traced through transformers'
cache classes, which pin the query length or the past length when exported. One implementation covers
the families InternVL ships (they differ only in q/k/v bias and Qwen3's per-head q/k RMSNorm once
InternLM2's packed projections are unpacked); the rotary frequencies are taken from transformers' own
rotary module, so every RoPE variant it knows comes for free. The self-check compares the graph with the
transformers model on a prefill and a decode step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .common import check_close, export_onnx, ort_session

# Logits: absolute 1e-3 plus 1e-5 of the largest logit (float32 rounding grows with the magnitude).
TOLERANCE = 1e-3
RTOL = 1e-5


@dataclass
class LlmSpec:
    arch: str  # transformers model_type of the reference: qwen2 | llama | qwen3
    family: str  # what the checkpoint calls it: qwen2 | llama | qwen3 | internlm2
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

    def __init__(self, spec: LlmSpec, weights: dict[str, torch.Tensor], inv_freq: torch.Tensor, rope_scale: float,
                 fused: bool = False):
        super().__init__()
        self.spec = spec
        self.fused = fused
        if fused:
            freqs = torch.arange(spec.max_context, dtype=torch.float32)[:, None] * inv_freq.float()[None]
            self.register_buffer("cos_cache", freqs.cos() * rope_scale, persistent=False)
            self.register_buffer("sin_cache", freqs.sin() * rope_scale, persistent=False)
        self.w = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v, requires_grad=False)
                                   for k, v in weights.items()
                                   if k.startswith("model.language_model.") or k == "lm_head.weight"})
        if "lm_head__weight" not in self.w:  # tied embeddings
            self.w["lm_head__weight"] = self.w["model__language_model__embed_tokens__weight"]
        self.register_buffer("inv_freq", inv_freq.detach().clone().float(), persistent=False)
        self.rope_scale = float(rope_scale)

    def p(self, name: str):
        return self.w[name.replace(".", "__")]

    def opt(self, name: str):
        return self.w.get(name.replace(".", "__"))

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        s = self.spec
        h = inputs_embeds
        if self.fused:
            # GroupQueryAttention's view of the mask: index of each sequence's last key, and the width.
            seqlens_k = (attention_mask.sum(-1) - 1).to(torch.int32)
            total = torch.ones_like(attention_mask[0]).sum().to(torch.int32)
        else:
            # Causal + padding mask without shape arithmetic: a key at cache position p is visible to a query
            # at position q when p <= q and the key is not padding. Works for any past / seq length.
            key_pos = torch.cumsum(attention_mask, dim=-1) - 1  # [b, kv]
            visible = (key_pos[:, None, :] <= position_ids[:, :, None]) & (attention_mask[:, None, :] > 0)
            # Additive bias [b, 1, 1, q, kv], built once and broadcast over kv heads and group in every layer.
            bias = (~visible[:, None, None]).to(torch.float32) * torch.finfo(torch.float32).min
            freqs = position_ids[..., None].float() * self.inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[:, None] * self.rope_scale, emb.sin()[:, None] * self.rope_scale  # [b, 1, q, d]
        presents = []
        for i in range(s.layers):
            pre = f"model.language_model.layers.{i}."
            x = _rms_norm(h, self.p(pre + "input_layernorm.weight"), s.eps)
            b, q_len = x.shape[0], x.shape[1]

            def proj(name, heads, x=x, pre=pre, b=b, q_len=q_len):
                y = nn.functional.linear(x, self.p(f"{pre}self_attn.{name}.weight"), self.opt(f"{pre}self_attn.{name}.bias"))
                y = y.view(b, q_len, heads, s.head_dim)
                norm = self.opt(f"{pre}self_attn.{name[0]}_norm.weight")  # Qwen3: per-head RMSNorm before RoPE
                if norm is not None:
                    y = _rms_norm(y, norm, s.eps)
                return y

            q, k, v = proj("q_proj", s.heads), proj("k_proj", s.kv_heads), proj("v_proj", s.kv_heads)
            if self.fused:
                ctx, k, v = FusedAttention.apply(
                    q.reshape(b, q_len, -1), k.reshape(b, q_len, -1), v.reshape(b, q_len, -1), past[2 * i],
                    past[2 * i + 1], seqlens_k, total, self.cos_cache, self.sin_cache, s.heads, s.kv_heads,
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
            h = h + nn.functional.linear(ctx, self.p(pre + "self_attn.o_proj.weight"), self.opt(pre + "self_attn.o_proj.bias"))
            x = _rms_norm(h, self.p(pre + "post_attention_layernorm.weight"), s.eps)
            gate = nn.functional.linear(x, self.p(pre + "mlp.gate_proj.weight"))
            up = nn.functional.linear(x, self.p(pre + "mlp.up_proj.weight"))
            h = h + nn.functional.linear(nn.functional.silu(gate) * up, self.p(pre + "mlp.down_proj.weight"))
        last = _rms_norm(h[:, -1, :], self.p("model.language_model.norm.weight"), s.eps)
        return (nn.functional.linear(last, self.p("lm_head.weight")), *presents)


class _WithoutPositions(nn.Module):
    def __init__(self, dec: Decoder):
        super().__init__()
        self.dec = dec

    def forward(self, inputs_embeds, attention_mask, *past):
        return self.dec(inputs_embeds, attention_mask, None, *past)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def io_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids", *past], ["logits", *present]


def build(spec: LlmSpec, model, fused: bool = False) -> Decoder:
    """Our decoder over the reference model's tensors (shared, not copied)."""
    rot = model.model.language_model.rotary_emb
    weights = dict(model.state_dict(keep_vars=False))
    return Decoder(spec, weights, rot.inv_freq, getattr(rot, "attention_scaling", 1.0), fused).eval()


def can_fuse(spec: LlmSpec) -> bool:
    """ONNX Runtime's CPU GroupQueryAttention with rotary needs head_dim to be a multiple of 16."""
    return spec.head_dim % 16 == 0


def export_decoder(spec: LlmSpec, model, out: Path, seed: int = 0) -> dict:
    fused = can_fuse(spec)
    dec = build(spec, model, fused)
    inputs, outputs = io_names(spec.layers)
    gen = torch.Generator().manual_seed(seed)
    batch, seq, past = 2, 3, 4
    embeds = torch.randn(batch, seq, spec.hidden, generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64)[None].repeat(batch, 1)
    pkv = [torch.randn(batch, spec.kv_heads, past, spec.head_dim, generator=gen) for _ in range(2 * spec.layers)]
    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    axes.update({name: {0: "batch", 2: "past"} for name in inputs[3:]})
    axes.update({name: {0: "batch", 2: "total"} for name in outputs[1:]})
    args = (embeds, mask, pos, *pkv)
    module = dec
    if fused:
        # The kernel takes positions from the cache length: no position_ids input (batch rows unpadded).
        inputs = [n for n in inputs if n != "position_ids"]
        axes.pop("position_ids")
        args = (embeds, mask, *pkv)
        module = _WithoutPositions(dec)
    export_onnx(module, args, out, inputs, outputs, axes)
    diff = self_check(spec, model, out, seed)
    return {
        "file": out.name, "arch": spec.family, "layers": spec.layers, "hidden": spec.hidden, "heads": spec.heads,
        "kv_heads": spec.kv_heads, "head_dim": spec.head_dim, "vocab": spec.vocab, "max_context": spec.max_context,
        "attention": "GroupQueryAttention" if fused else "onnx",
        "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask",
                   "position_ids": None if fused else "position_ids",
                   "past_key": "past_key_values.{}.key", "past_value": "past_key_values.{}.value"},
        "outputs": {"logits": "logits", "present_key": "present.{}.key", "present_value": "present.{}.value"},
        "max_abs_diff": diff, "tolerance": TOLERANCE, "rtol": RTOL,
    }


def self_check(spec: LlmSpec, model, path: Path, seed: int) -> float:
    """ONNX Runtime vs the transformers model: a prefill from an empty cache, then one decode step fed with
    ONNX Runtime's own present tensors, the way the runtime chains them."""
    from transformers import DynamicCache

    sess = ort_session(path)
    inputs, outputs = io_names(spec.layers)
    have = {i.name for i in sess.get_inputs()}
    gen = torch.Generator().manual_seed(seed + 7)
    prompt = torch.randn(1, 9, spec.hidden, generator=gen)
    step = torch.randn(1, 1, spec.hidden, generator=gen)
    lm = model.model.language_model
    with torch.no_grad():
        cache = DynamicCache(config=model.config.text_config)
        h = lm(inputs_embeds=prompt, past_key_values=cache, use_cache=True).last_hidden_state
        want_prefill = model.lm_head(h[:, -1]).numpy()
        h = lm(inputs_embeds=step, past_key_values=cache, use_cache=True).last_hidden_state
        want_step = model.lm_head(h[:, -1]).numpy()
    empty = np.zeros((1, spec.kv_heads, 0, spec.head_dim), np.float32)
    feed = {inputs[0]: prompt.numpy(), inputs[1]: np.ones((1, 9), np.int64),
            inputs[2]: np.arange(9, dtype=np.int64)[None]}
    feed.update({n: empty for n in inputs[3:]})
    res = sess.run(outputs, {k: v for k, v in feed.items() if k in have})
    d1 = check_close("decoder.onnx prefill logits", res[0], want_prefill, TOLERANCE, RTOL)
    feed = {inputs[0]: step.numpy(), inputs[1]: np.ones((1, 10), np.int64), inputs[2]: np.array([[9]], np.int64)}
    feed.update(dict(zip(inputs[3:], res[1:], strict=True)))
    res = sess.run(outputs, {k: v for k, v in feed.items() if k in have})
    d2 = check_close("decoder.onnx decode-step logits", res[0], want_step, TOLERANCE, RTOL)
    return max(d1, d2)
