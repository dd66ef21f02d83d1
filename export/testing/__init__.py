"""Test oracles and fixtures of the exporter: random-weight checkpoints of the real architectures (`tiny`,
`tiny_tokenizer`), the PyTorch reference outputs (`golden`), the model card's preprocessing (`reference`) and
transformers 4.37's slow tokenizers written out (`reference_tokenizer`).

They are what the exporter and the Rust runtime are checked against, not behaviour we ship, so they live apart:
`python -m export` (what users run) never imports this package. The tests, the benchmarks and the demo do;
`python -m export.testing --help` is their CLI.
"""
