"""The token embedding table as a raw little-endian float32 file `[vocab, hidden]`.

Not a graph: the runtime reads only the rows of the tokens it embeds, with positioned reads, so the
table (545 MB for Qwen2.5-0.5B) costs neither a session nor a copy in RAM, and image embeddings are
spliced in by the runtime before the decoder sees `inputs_embeds`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def export_embedding(weights, out: Path) -> dict:
    """From `weights.Weights`: the one table in memory, float32, while it is written."""
    weight = weights.get("model.language_model.embed_tokens.weight").numpy()
    np.ascontiguousarray(weight, dtype="<f4").tofile(out)
    return {"file": out.name, "dtype": "float32", "vocab": int(weight.shape[0]), "hidden": int(weight.shape[1])}
