"""The official InternVL code's behaviour, kept literal: the model card (`model_card`), the remote code's chat()
(`official_chat`), its slow tokenizer's decoding (`slow_decode`) and load_video's frames (`video_frames`).

Run in the reference venvs (scripts/reference_env.sh: transformers 4.37 / 4.55, torchvision, decord) as
`python -m tests.oracle.NAME` with the repository root as the working folder; they import only each other and
what those venvs hold, never `export`. (tests/python/test_preprocess.py also imports model_card's pure tiling
functions in the main venv.) The oracles that run in the main venv live in `export.testing`.
"""
