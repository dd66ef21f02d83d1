"""python -m export.testing: the test oracles' CLI (scripts/demo.sh, scripts/gpu_check.sh).

  python -m export.testing tiny --out DIR [--shape tiny|internvl2_5-1b|internvl2_5-8b] random-weight checkpoint
  python -m export.testing golden --cases cases.json --out golden.json    PyTorch reference outputs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    """As `python -m export`: the library raises typed errors (export/common.py); here they become one line on
    stderr and exit status 1."""
    from ..common import exit_on_error

    exit_on_error(run, argv)


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export.testing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny", help="write a random-weight checkpoint of the real architecture")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shape", default="tiny", choices=["tiny", "internvl2_5-1b", "internvl2_5-8b"],
                   help="internvl2_5-8b: 16 GB, sharded, with --family internlm2 --layout original")
    p.add_argument("--family", default="qwen2", choices=["qwen2", "llama", "qwen3", "internlm2", "phi3"],
                   help="LLM")
    p.add_argument("--vision", default="300m", choices=["300m", "6b"], help="InternViT variant")
    p.add_argument("--layout", default="hf", choices=["hf", "original"], help="checkpoint layout to write")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("golden", help="PyTorch greedy outputs for test cases")
    p.add_argument("--cases", required=True, type=Path, help="JSON list of cases (see export/testing/golden.py)")
    p.add_argument("--out", required=True, type=Path)

    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "tiny":
        from .tiny import make_checkpoint

        make_checkpoint(args.out, shape=args.shape, seed=args.seed, family=args.family, vision=args.vision,
                        layout=args.layout)
    else:
        from .golden import write_goldens

        write_goldens(args.cases, args.out)


if __name__ == "__main__":
    main()
