"""vision.onnx: pixel_values [tiles,3,448,448] -> image embeddings [tiles,256,llm_hidden].

InternViT (300M or 6B: LayerNorm or RMSNorm, optional qk-normalisation, layer scale), the drop of the
class token, pixel shuffle (0.5; `ps_version` v1 or v2) and the MLP projector in one graph, so the
runtime hands tiles in and gets rows to splice into the LLM's input embeddings out.

The forward pass is written here, over the checkpoint's weights in canonical (transformers `-hf`)
names, so both checkpoint layouts export through the same code; the export's check and the tests compare
it with transformers' own InternVL implementation. The module runs over placeholders when traced and over
weights read one at a time from the checkpoint when run (`writer.py`), so neither holds the tower.

`dtype` float16 / bfloat16: convolution, matmuls, attention and the MLPs in that type; the residual
stream, the norms, the layer scales and the position embeddings in fp32 (InternViT-6B is trained in bf16
and its activations overflow fp16), pixels in and embeddings out in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import writer
from .common import TORCH_DTYPES

INPUT = "pixel_values"
OUTPUT = "image_embeds"
TOLERANCE = 1e-3
RTOL = 1e-5


@dataclass
class VisionSpec:
    hidden: int
    layers: int
    heads: int
    norm: str  # "layer_norm" | "rms_norm"
    eps: float
    qk_norm: bool
    image_size: int
    patch_size: int
    downsample_ratio: float
    ps_version: str  # "v1" | "v2"
    select_layer: int  # -1 = last layer's output


class FusedMHA(torch.autograd.Function):
    """Full (non-causal) multi-head attention as ONNX Runtime's `com.microsoft::MultiHeadAttention`:
    measured 17.9 vs 21.3 ms per layer for the same math in plain operators (1025 tokens, 16 heads, 2
    threads), about 80 ms per tile over InternViT-300M's 24 layers. q, k, v, output: [tiles, tokens, hidden]."""

    @staticmethod
    def forward(ctx, q, k, v, heads):
        if writer.tracing():  # the values are not needed (see writer.MatMul)
            return torch.zeros_like(q)
        b, n, hidden = q.shape
        d = hidden // heads
        q, k, v = (x.reshape(b, n, heads, d).transpose(1, 2) for x in (q, k, v))
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * d**-0.5, dim=-1)
        return torch.matmul(attn, v).transpose(1, 2).reshape(b, n, hidden)

    @staticmethod
    def symbolic(g, q, k, v, heads):
        return g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)


def _norm(kind: str, dim: int, w, b, eps):
    if kind == "rms_norm":
        return lambda x: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    return lambda x: nn.functional.layer_norm(x, (dim,), w, b, eps)


PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


class VisionEncoder(nn.Module):
    """`trace`: weights are placeholder parameters (the graph's named inputs); otherwise each is read from
    `weights` when the forward pass reaches it and dropped after."""

    def __init__(self, spec: VisionSpec, weights: writer.GraphWeights, trace: bool = False):
        super().__init__()
        self.spec = spec
        self.t = weights.dtype
        self.trace = trace
        if trace:
            names = [n for n in weights.names() if n.startswith(PREFIXES) and writer.layer_of(n) < layers_run(spec)]
            self.w = writer.parameters(names, weights)
        else:
            self.src = weights

    def p(self, name: str):
        return self.w[name.replace(".", "__")] if self.trace else self.src[name]

    def has(self, name: str) -> bool:
        return name.replace(".", "__") in self.w if self.trace else name in self.src

    def forward(self, pixel_values):
        s, p, t = self.spec, self.p, self.t
        e = "model.vision_tower.embeddings."
        x = nn.functional.conv2d(pixel_values.to(t), p(e + "patch_embeddings.projection.weight"),
                                 p(e + "patch_embeddings.projection.bias"), stride=s.patch_size)
        x = x.flatten(2).transpose(1, 2).float()  # [tiles, patches, hidden]: the residual stream, fp32
        cls = p(e + "cls_token").expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + p(e + "position_embeddings")
        for i in range(layers_run(s)):
            pre = f"model.vision_tower.encoder.layer.{i}."
            norm1 = _norm(s.norm, s.hidden, p(pre + "layernorm_before.weight"),
                          p(pre + "layernorm_before.bias") if s.norm == "layer_norm" else None, s.eps)
            norm2 = _norm(s.norm, s.hidden, p(pre + "layernorm_after.weight"),
                          p(pre + "layernorm_after.bias") if s.norm == "layer_norm" else None, s.eps)
            h = norm1(x).to(t)
            a = pre + "attention."

            def proj(name, h=h, a=a):
                bias = p(a + name + ".bias") if self.has(a + name + ".bias") else None
                return linear(h, p(a + name + ".weight"), bias)

            q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
            if s.qk_norm:
                q = _norm("rms_norm", s.hidden, p(a + "q_norm.weight"), None, s.eps)(q.float()).to(t)
                k = _norm("rms_norm", s.hidden, p(a + "k_norm.weight"), None, s.eps)(k.float()).to(t)
            ctx = FusedMHA.apply(q, k, v, s.heads)
            ctx = linear(ctx, p(a + "projection_layer.weight"), p(a + "projection_layer.bias"))
            x = x + p(pre + "lambda_1") * ctx.float()
            h = norm2(x).to(t)
            h = linear(h, p(pre + "mlp.fc1.weight"), p(pre + "mlp.fc1.bias"))
            h = nn.functional.gelu(h)
            h = linear(h, p(pre + "mlp.fc2.weight"), p(pre + "mlp.fc2.bias"))
            x = x + p(pre + "lambda_2") * h.float()
        x = x[:, 1:, :]
        side = s.image_size // s.patch_size
        x = pixel_shuffle(x.reshape(x.shape[0], side, side, s.hidden), s.downsample_ratio, s.ps_version)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        m = "model.multi_modal_projector."
        dim = s.hidden * int(1 / s.downsample_ratio) ** 2
        x = nn.functional.layer_norm(x, (dim,), p(m + "layer_norm.weight"), p(m + "layer_norm.bias"), 1e-5).to(t)
        x = linear(x, p(m + "linear_1.weight"), p(m + "linear_1.bias"))
        x = nn.functional.gelu(x)
        return linear(x, p(m + "linear_2.weight"), p(m + "linear_2.bias")).float()


def linear(x, w, b=None):
    """x @ w (+ b) with w stored [in, out] (see writer.py)."""
    y = writer.MatMul.apply(x, w)
    return y if b is None else y + b


def keep_fp32(name: str) -> bool:
    """What the fp32 residual stream uses directly stays fp32 in every graph type: norms, layer scales, the
    class token and position embeddings."""
    return any(f in name for f in ("norm", "layernorm", "lambda_", "cls_token", "position_embeddings"))


def graph_weights(weights, dtype: str) -> writer.GraphWeights:
    return writer.GraphWeights(weights, TORCH_DTYPES[dtype], keep_fp32)


def layers_run(spec: VisionSpec) -> int:
    """Encoder layers up to `select_layer` (-1: all of them)."""
    return spec.layers + spec.select_layer + 1 if spec.select_layer < 0 else spec.select_layer


def pixel_shuffle(x, scale: float, version: str):
    """The reference `pixel_shuffle`: v2 swaps height and width back at the end, v1 (early InternVL 1.5)
    leaves them transposed."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3) if version == "v2" else x


def export_vision(spec: VisionSpec, weights, out: Path, dtype: str = "float32", quant=None, seed: int = 0) -> dict:
    """The graph of `spec` (as many layers as it says) in `dtype`, weights from `weights` (`weights.Weights`),
    quantised by `quant` (`writer.Int8`); checked by the caller (`check.py`)."""
    gw = graph_weights(weights, dtype)
    enc = VisionEncoder(spec, gw, trace=True).eval()
    size = spec.image_size
    # Two tiles: a batch-1 example can pin the tile dimension (shared/notes).
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    figures = writer.write(enc, (example,), out, [INPUT], [OUTPUT], {INPUT: {0: "tiles"}, OUTPUT: {0: "tiles"}},
                           gw, quant)
    tokens = int(size // spec.patch_size * spec.downsample_ratio) ** 2
    embed_dim = int(weights.shapes["model.multi_modal_projector.linear_2.weight"][0])
    return {
        "file": out.name, "input": INPUT, "output": OUTPUT, "image_size": size, "patch_size": spec.patch_size,
        "tokens_per_tile": tokens, "embed_dim": embed_dim, "dtype": dtype if quant is None else "int8",
        "arch": "internvit-6b" if spec.qk_norm or spec.norm == "rms_norm" else "internvit-300m",
        "ps_version": spec.ps_version, "select_layer": spec.select_layer,
        **({"quantization": figures} if figures else {}),
    }
