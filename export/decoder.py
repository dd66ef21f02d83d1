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

from .common import TORCH_DTYPES, CheckpointError, check_close, export_onnx, ort_session

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

    def __init__(self, spec: LlmSpec, weights: dict[str, torch.Tensor], rope: Rope, fused: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        self.fused = fused
        self.rope = rope
        self.t = dtype
        if fused:
            # The tables in float64, rounded once: torch 2.15's float32 cos over this many elements was
            # measured to come out with ~3e-5 errors in some processes (sin never), enough to fail the check.
            pos = torch.arange(spec.max_context, dtype=torch.float64)[:, None]
            for name, inv in (("", rope.inv_freq), ("long_", rope.long_inv_freq)):
                if inv is not None:
                    freqs = pos * inv.float().double()[None]
                    self.register_buffer(name + "cos_cache", (freqs.cos() * rope.scale).to(dtype), persistent=False)
                    self.register_buffer(name + "sin_cache", (freqs.sin() * rope.scale).to(dtype), persistent=False)
        self.w = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(weight_in(k, v, dtype), requires_grad=False)
                                   for k, v in weights.items()
                                   if k.startswith("model.language_model.") or k == "lm_head.weight"})
        if "lm_head__weight" not in self.w:  # tied embeddings
            self.w["lm_head__weight"] = self.w["model__language_model__embed_tokens__weight"]
        self.register_buffer("inv_freq", rope.inv_freq.detach().clone().float(), persistent=False)
        if rope.long_inv_freq is not None:
            self.register_buffer("long_inv_freq", rope.long_inv_freq.detach().clone().float(), persistent=False)
        self.rope_scale = float(rope.scale)

    def p(self, name: str):
        return self.w[name.replace(".", "__")]

    def opt(self, name: str):
        return self.w.get(name.replace(".", "__"))

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
                y = nn.functional.linear(x, self.p(f"{pre}self_attn.{name}.weight"), self.opt(f"{pre}self_attn.{name}.bias"))
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
            attn = nn.functional.linear(ctx, self.p(pre + "self_attn.o_proj.weight"), self.opt(pre + "self_attn.o_proj.bias"))
            h = h + attn.float()
            x = _rms_norm(h, self.p(pre + "post_attention_layernorm.weight"), s.eps).to(t)
            gate = nn.functional.linear(x, self.p(pre + "mlp.gate_proj.weight"))
            up = nn.functional.linear(x, self.p(pre + "mlp.up_proj.weight"))
            h = h + nn.functional.linear(nn.functional.silu(gate) * up, self.p(pre + "mlp.down_proj.weight")).float()
        last = _rms_norm(h[:, -1, :], self.p("model.language_model.norm.weight"), s.eps).to(t)
        return (nn.functional.linear(last, self.p("lm_head.weight")).float(), *presents)


def weight_in(name: str, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight in the graph's type; norm weights stay fp32 (the norms run in fp32). fp32 is not copied."""
    return w if dtype == torch.float32 or "norm" in name.rsplit(".", 2)[-2] else w.to(dtype)


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


def empty_past(layers: int, kv_heads: int, head_dim: int, dtype=np.float32) -> dict[str, np.ndarray]:
    empty = np.zeros((1, kv_heads, 0, head_dim), dtype)
    return {n: empty for n in io_names(layers)[0][6:]}


def canonical_weights(model) -> dict[str, torch.Tensor]:
    """The reference's LLM tensors under the names the decoder reads: Phi-3's fused `qkv_proj` (rows q, k, v)
    and `gate_up_proj` (rows gate, up) split into views, everything else as is (shared, not copied)."""
    out = {}
    cfg = model.config.text_config
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    for name, t in model.state_dict(keep_vars=False).items():
        if name.endswith("self_attn.qkv_proj.weight"):
            pre = name[: -len("qkv_proj.weight")]
            sizes = [heads * head_dim, kv * head_dim, kv * head_dim]
            out.update(zip((pre + n + ".weight" for n in ("q_proj", "k_proj", "v_proj")), t.split(sizes), strict=True))
        elif name.endswith("mlp.gate_up_proj.weight"):
            pre = name[: -len("gate_up_proj.weight")]
            out[pre + "gate_proj.weight"], out[pre + "up_proj.weight"] = t.chunk(2, dim=0)
        else:
            out[name] = t
    return out


def build(spec: LlmSpec, model, fused: bool = False, dtype: torch.dtype = torch.float32) -> Decoder:
    """Our decoder over the reference model's tensors."""
    return Decoder(spec, canonical_weights(model), rope_of(model), fused, dtype).eval()


def graph_module(spec: LlmSpec, model, dtype: torch.dtype) -> nn.Module:
    """The module the graph is traced from, taking the graph's inputs in order."""
    dec = build(spec, model, can_fuse(spec), dtype)
    return _Graph(dec, dec.rope.long_inv_freq is not None)


def can_fuse(spec: LlmSpec) -> bool:
    """ONNX Runtime's CPU GroupQueryAttention with rotary needs head_dim to be a multiple of 16."""
    return spec.head_dim % 16 == 0


def export_decoder(spec: LlmSpec, model, out: Path, seed: int = 0, dtype: str = "float32") -> dict:
    """The graph in `dtype`; an fp32 graph is checked against transformers here, the others against the fp32
    graph by the caller (`precision.drift`)."""
    fused = can_fuse(spec)
    t = TORCH_DTYPES[dtype]
    graph = graph_module(spec, model, t)
    dec, long_rope = graph.dec, graph.long_rope
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
    export_onnx(graph, args, out, inputs, outputs, axes)
    diff = self_check(spec, model, out, seed) if dtype == "float32" else None
    return {
        "file": out.name, "arch": spec.family, "layers": spec.layers, "hidden": spec.hidden, "heads": spec.heads,
        "kv_heads": spec.kv_heads, "head_dim": spec.head_dim, "vocab": spec.vocab, "max_context": spec.max_context,
        "attention": "GroupQueryAttention" if fused else "onnx", "long_rope_after": dec.rope.long_after,
        "dtype": dtype, "kv_dtype": dtype,
        "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": None if fused else "attention_mask",
                   "position_ids": None if fused else "position_ids",
                   "seqlens_k": "seqlens_k" if fused else None,
                   "total_sequence_length": "total_sequence_length" if fused else None,
                   "long_rope": "long_rope" if long_rope else None,
                   "past_key": "past_key_values.{}.key", "past_value": "past_key_values.{}.value"},
        "outputs": {"logits": "logits", "present_key": "present.{}.key", "present_value": "present.{}.value"},
        **({"max_abs_diff": diff, "tolerance": TOLERANCE, "rtol": RTOL} if diff is not None else {}),
    }


def self_check(spec: LlmSpec, model, path: Path, seed: int) -> float:
    """ONNX Runtime vs the transformers model: a prefill from an empty cache, then one decode step fed with
    ONNX Runtime's own present tensors, the way the runtime chains them. LongRoPE models are checked with
    both factor sets (the reference made to use the long ones throughout for the second pass)."""
    sess = ort_session(path)
    rot = model.model.language_model.rotary_emb
    rope = rope_of(model)
    diff = _check_pair(spec, model, sess, seed, long=False)
    if rope.long_inv_freq is not None:
        short = rot.original_inv_freq.clone()
        try:
            rot.original_inv_freq.copy_(rope.long_inv_freq)
            diff = max(diff, _check_pair(spec, model, sess, seed, long=True))
        finally:
            rot.original_inv_freq.copy_(short)
            rot.inv_freq.copy_(short)
    return diff


def _check_pair(spec: LlmSpec, model, sess, seed: int, long: bool) -> float:
    from transformers import DynamicCache

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
    res = sess.run(outputs, step_feed(have, prompt.numpy(), empty_past(spec.layers, spec.kv_heads, spec.head_dim),
                                      0, int(long)))
    what = "long-factor " if long else ""
    d1 = check_close(f"decoder.onnx {what}prefill logits", res[0], want_prefill, TOLERANCE, RTOL)
    res = sess.run(outputs, step_feed(have, step.numpy(), dict(zip(inputs[6:], res[1:], strict=True)), 9, int(long)))
    d2 = check_close(f"decoder.onnx {what}decode-step logits", res[0], want_step, TOLERANCE, RTOL)
    return max(d1, d2)
