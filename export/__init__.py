"""Turn an InternVL checkpoint, as a user downloads it, into the ONNX model folder the Rust runtime loads.

One module per exported graph (`vision`, `decoder`, `embed`), the checkpoint reader in `checkpoint`, the
manifest schema in `manifest`, shared helpers in `common`; `python -m export --help` is the CLI.
"""

EXPORTER_VERSION = "0.3.0"  # 0.2: tokenizer.answer, stop ids per layout; 0.3: files, pinned output shapes
