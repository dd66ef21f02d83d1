"""Test oracles and fixtures of the exporter: random-weight checkpoints of the real architectures (`tiny`,
`tiny_tokenizer`), the PyTorch reference outputs (`golden`, `pytorch`), the model card's preprocessing
(`reference`), transformers 4.37's slow tokenizers written out (`reference_tokenizer`) and GPT-2's byte map of
byte-level BPE vocabularies (`byte_level`).

They are what the exporter and the Rust runtime are checked against, not behaviour we ship, so they live apart:
`python -m export` (what users run) never imports this package. The tests, the benchmarks, the fuzz seeds and the
demo do; `python -m export.testing --help` is their CLI. Every oracle that runs in the main venv (transformers 5)
is here; the official InternVL code, run in the reference venvs, is tests/oracle.
"""
