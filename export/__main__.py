"""python -m export: the exporter's one CLI.

  python -m export --checkpoint DIR_OR_HUB_ID --out models/NAME    checkpoint -> model folder
  python -m export tiny --out DIR [--shape tiny|internvl2_5-1b]     random-weight checkpoint
  python -m export golden --cases cases.json --out golden.json     PyTorch reference outputs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMMANDS = ("convert", "tiny", "golden")


def main(argv: list[str] | None = None) -> None:
    """The CLI: the library raises typed errors (export/common.py); here they become one line on stderr
    and exit status 1."""
    from .common import ExportCheckError, ExportError

    try:
        run(argv)
    except ExportCheckError as e:
        sys.exit(f"export check failed: {e}")
    except ExportError as e:
        sys.exit(str(e))


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "convert")  # the main job needs no subcommand
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="export a checkpoint to a model folder (default)")
    p.add_argument("--checkpoint", required=True, help="local checkpoint folder or hub id (OpenGVLab/...-hf)")
    p.add_argument("--out", required=True, type=Path, help="model folder to write")
    p.add_argument("--template", help="conversation template name (default: from the checkpoint)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "int8", "int4", "int4-float16", "int4-bfloat16"],
                   help="graphs: float32; float16 / bfloat16 (for GPUs: weights, activations and KV cache; norms "
                        "fp32); int8 (vision + decoder, for CPUs); int4 (decoder, vision int8; for CPUs); "
                        "int4-float16 / int4-bfloat16 (for GPUs: the float16 / bfloat16 export with the decoder's "
                        "matmul weights in 4 bits)")
    p.add_argument("--int4-block", type=int, default=32, choices=[32, 128],
                   help="int4: weights per quantisation block (32: closer to fp32; 128: smaller)")

    p = sub.add_parser("tiny", help="write a random-weight checkpoint of the real architecture")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shape", default="tiny", choices=["tiny", "internvl2_5-1b"])
    p.add_argument("--family", default="qwen2", choices=["qwen2", "llama", "qwen3", "internlm2", "phi3"],
                   help="LLM")
    p.add_argument("--vision", default="300m", choices=["300m", "6b"], help="InternViT variant")
    p.add_argument("--layout", default="hf", choices=["hf", "original"], help="checkpoint layout to write")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("golden", help="PyTorch greedy outputs for test cases")
    p.add_argument("--cases", required=True, type=Path, help="JSON list of cases (see export/golden.py)")
    p.add_argument("--out", required=True, type=Path)

    args = parser.parse_args(argv)
    if args.command == "convert":
        from .convert import convert

        convert(args.checkpoint, args.out, template=args.template, force=args.force, dtype=args.dtype,
                int4_block=args.int4_block)
    elif args.command == "tiny":
        from .tiny import make_checkpoint

        make_checkpoint(args.out, shape=args.shape, seed=args.seed, family=args.family, vision=args.vision,
                        layout=args.layout)
    else:
        from .golden import write_goldens

        write_goldens(args.cases, args.out)


if __name__ == "__main__":
    main()
