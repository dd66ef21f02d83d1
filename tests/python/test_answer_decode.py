"""Answer text from ids equal to the reference tokenizer's, fuzzed: random id sequences (byte-fallback
tokens, added and special tokens, ordinary pieces) and texts with spaces before punctuation, decoded by
`internvl tokenize --decode` with the exported manifest's rules and by the checkpoint's slow tokenizer the
way the official chat() decodes (tests/oracle/slow_decode.py, in the transformers the code pins)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "build" / "fixtures"
FAMILIES = {
    "qwen2-original": (".venv-ref437", False),
    "llama-original": (".venv-ref437", False),
    "internlm2-original": (".venv-ref437", False),
    "phi3-original": (".venv-ref437", False),
    "qwen3-original": (".venv-ref455", True),
}
TEXTS = ["Hello , world . Is it ? yes ! don 't , I 'm here ' ok ' we 're you 've it 's",
         " leading and trailing  ", "你好，世界！ 😀 naïve café", "a\n\nb\tc", "x <|im_end|> y"]


def cli(*args) -> str:
    r = subprocess.run([str(ROOT / "target" / "release" / "internvl"), *args], capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module", autouse=True)
def reference_env():
    subprocess.run(["cargo", "build", "--release", "--bin", "internvl"], cwd=ROOT, check=True)
    subprocess.run([str(ROOT / "scripts" / "reference_env.sh")], check=True, timeout=900)


def sequences(model: Path, tmp: Path, seed: int) -> list[list[int]]:
    tok = json.loads((model / "tokenizer.json").read_text())
    manifest = json.loads((model / "manifest.json").read_text())
    vocab = manifest["tokenizer"]["vocab_size"]
    byte_ids = [i for t, i in tok["model"]["vocab"].items() if t.startswith("<0x") and len(t) == 6]
    added = [t["id"] for t in tok["added_tokens"]]
    rng = np.random.default_rng(seed)
    out = []
    for _n in range(300):
        ids = []
        for _ in range(int(rng.integers(1, 24))):
            r = rng.random()
            pool = byte_ids if r < 0.35 and byte_ids else added if r < 0.5 else None
            ids.append(int(rng.choice(pool)) if pool else int(rng.integers(0, min(vocab, 200000))))
        out.append(ids)
    (tmp / "texts.json").write_text(json.dumps(TEXTS))
    out += json.loads(cli("tokenize", "--model", str(model), "--file", str(tmp / "texts.json")))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoded_answers_equal_the_reference_tokenizer(tmp_path, family):
    env, keep_special = FAMILIES[family]
    model = FIXTURES / "models" / family
    seqs = sequences(model, tmp_path, seed=len(family))
    (tmp_path / "ids.json").write_text(json.dumps(seqs))
    split = json.loads((model / "manifest.json").read_text())["tokenizer"]["answer"]["split_at"]
    cmd = [str(ROOT / env / "bin" / "python"), "-m", "tests.oracle.slow_decode", "--checkpoint",
           str(FIXTURES / "checkpoints" / family), "--ids", str(tmp_path / "ids.json"), "--split", split,
           "--out", str(tmp_path / "want.json"), *(["--keep-special"] if keep_special else [])]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    want = json.loads((tmp_path / "want.json").read_text())
    got = json.loads(cli("tokenize", "--model", str(model), "--decode", str(tmp_path / "ids.json")))
    bad = [(ids, g["answer"], w["answer"]) for ids, g, w in zip(seqs, got, want, strict=True)
           if g["answer"] != w["answer"]]
    assert not bad, f"{len(bad)} of {len(seqs)} answers differ; first: {bad[:3]}"
