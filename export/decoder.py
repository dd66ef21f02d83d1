"""decoder.onnx: one LLM step with the KV cache as explicit tensors.

inputs:  inputs_embeds [batch, seq, hidden] f32, attention_mask [batch, past+seq] i64 (1 = attend),
         position_ids [batch, seq] i64, past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
outputs: logits [batch, vocab] (last position only: prefill never ships seq x vocab floats),
         present.{i}.key / .value [batch, kv_heads, past+seq, head_dim]

The same graph serves prefill (past = 0) and decode (seq = 1). The forward pass is written here rather
than traced through transformers' cache classes, which pin the query length or the past length when
exported; it reads the checkpoint's own modules' weights, and the self-check compares it with the
transformers model on prefill and on a decode step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .common import check_close, export_onnx, ort_session

# Logits: absolute 1e-3 plus 1e-5 of the largest logit (measured: 1e-5 absolute on the tiny model).
TOLERANCE = 1e-3
RTOL = 1e-5


def _rms_norm(x, weight, eps):
    var = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(var + eps))


class Decoder(nn.Module):
    """Qwen2-architecture decoder: RMSNorm, RoPE, grouped-query attention with q/k/v bias, SwiGLU MLP."""

    def __init__(self, lm, text_cfg):
        super().__init__()
        self.lm = lm  # transformers' Qwen2Model
        self.head = None
        self.heads = text_cfg.num_attention_heads
        self.kv_heads = text_cfg.num_key_value_heads
        self.head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // self.heads
        self.eps = text_cfg.rms_norm_eps
        self.register_buffer("inv_freq", lm.rotary_emb.inv_freq.detach().clone().float(), persistent=False)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        h = inputs_embeds
        # Causal + padding mask without shape arithmetic: a key at cache position p is visible to a query
        # at position q when p <= q and the key is not padding. Works for any past / seq length.
        key_pos = torch.cumsum(attention_mask, dim=-1) - 1  # [b, kv]
        visible = (key_pos[:, None, :] <= position_ids[:, :, None]) & (attention_mask[:, None, :] > 0)
        # Additive bias [b, 1, 1, q, kv], built once and broadcast over kv heads and group in every layer.
        bias = (~visible[:, None, None]).to(torch.float32) * torch.finfo(torch.float32).min
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [b, 1, q, d]
        presents = []
        for i, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            x = _rms_norm(h, layer.input_layernorm.weight, self.eps)
            b, q_len = x.shape[0], x.shape[1]
            q = attn.q_proj(x).view(b, q_len, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k = torch.cat((past[2 * i], k), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            presents += [k, v]
            # Grouped-query attention without repeating K/V: queries [b, kv_heads, group, q, d].
            qg = q.reshape(b, self.kv_heads, self.heads // self.kv_heads, q_len, self.head_dim)
            scores = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * (self.head_dim**-0.5) + bias
            probs = torch.softmax(scores, dim=-1)
            ctx = torch.matmul(probs, v[:, :, None])  # [b, kvh, g, q, d]
            ctx = ctx.reshape(b, self.heads, q_len, self.head_dim).transpose(1, 2).reshape(b, q_len, -1)
            h = h + attn.o_proj(ctx)
            x = _rms_norm(h, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            h = h + mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        last = _rms_norm(h[:, -1, :], self.lm.norm.weight, self.eps)
        return (self.head(last), *presents)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def io_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids", *past], ["logits", *present]


def build(model) -> Decoder:
    text_cfg = model.config.text_config
    dec = Decoder(model.model.language_model, text_cfg)
    dec.head = model.lm_head
    return dec.eval()


def _inputs(dec: Decoder, hidden: int, batch: int, seq: int, past: int, gen: torch.Generator):
    embeds = torch.randn(batch, seq, hidden, generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64)[None].repeat(batch, 1)
    pkv = [torch.randn(batch, dec.kv_heads, past, dec.head_dim, generator=gen)
           for _ in range(2 * len(dec.lm.layers))]
    return embeds, mask, pos, pkv


def export_decoder(model, out: Path, seed: int = 0) -> dict:
    dec = build(model)
    text_cfg = model.config.text_config
    layers, hidden = len(dec.lm.layers), text_cfg.hidden_size
    inputs, outputs = io_names(layers)
    gen = torch.Generator().manual_seed(seed)
    embeds, mask, pos, pkv = _inputs(dec, hidden, batch=2, seq=3, past=4, gen=gen)
    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    for name in inputs[3:]:
        axes[name] = {0: "batch", 2: "past"}
    for name in outputs[1:]:
        axes[name] = {0: "batch", 2: "total"}
    export_onnx(dec, (embeds, mask, pos, *pkv), out, inputs, outputs, axes)
    diff = self_check(model, out, seed)
    return {
        "file": out.name, "arch": "qwen2", "layers": layers, "hidden": hidden,
        "heads": dec.heads, "kv_heads": dec.kv_heads, "head_dim": dec.head_dim,
        "vocab": int(model.lm_head.weight.shape[0]),
        "max_context": int(text_cfg.max_position_embeddings),
        "inputs": {"inputs_embeds": inputs[0], "attention_mask": inputs[1], "position_ids": inputs[2],
                   "past_key": "past_key_values.{}.key", "past_value": "past_key_values.{}.value"},
        "outputs": {"logits": "logits", "present_key": "present.{}.key", "present_value": "present.{}.value"},
        "max_abs_diff": diff, "tolerance": TOLERANCE, "rtol": RTOL,
    }


def self_check(model, path: Path, seed: int) -> float:
    """ONNX Runtime vs the transformers model: a prefill from an empty cache, then one decode step fed with
    ONNX Runtime's own present tensors, the way the runtime chains them."""
    from transformers import DynamicCache

    sess = ort_session(path)
    layers = model.config.text_config.num_hidden_layers
    inputs, outputs = io_names(layers)
    gen = torch.Generator().manual_seed(seed + 7)
    hidden = model.config.text_config.hidden_size
    prompt = torch.randn(1, 9, hidden, generator=gen)
    step = torch.randn(1, 1, hidden, generator=gen)
    lm = model.model.language_model
    with torch.no_grad():
        cache = DynamicCache(config=model.config.text_config)
        h = lm(inputs_embeds=prompt, past_key_values=cache, use_cache=True).last_hidden_state
        want_prefill = model.lm_head(h[:, -1]).numpy()
        h = lm(inputs_embeds=step, past_key_values=cache, use_cache=True).last_hidden_state
        want_step = model.lm_head(h[:, -1]).numpy()
    dec = build(model)
    empty = np.zeros((1, dec.kv_heads, 0, dec.head_dim), np.float32)
    feed = {inputs[0]: prompt.numpy(), inputs[1]: np.ones((1, 9), np.int64),
            inputs[2]: np.arange(9, dtype=np.int64)[None]}
    feed.update({n: empty for n in inputs[3:]})
    res = sess.run(outputs, feed)
    d1 = check_close("decoder.onnx prefill logits", res[0], want_prefill, TOLERANCE, RTOL)
    feed = {inputs[0]: step.numpy(), inputs[1]: np.ones((1, 10), np.int64), inputs[2]: np.array([[9]], np.int64)}
    feed.update(dict(zip(inputs[3:], res[1:])))
    res = sess.run(outputs, feed)
    d2 = check_close("decoder.onnx decode-step logits", res[0], want_step, TOLERANCE, RTOL)
    return max(d1, d2)
