"""python -m export: the exporter's one CLI.

  python -m export --checkpoint DIR_OR_HUB_ID --out models/NAME    checkpoint -> model folder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMMANDS = ("convert",)


def main(argv: list[str] | None = None) -> None:
    """The CLI: the library raises typed errors (export/common.py); here they become one line on stderr
    and exit status 1."""
    from .common import exit_on_error

    exit_on_error(run, argv)


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
    p.add_argument("--dtype", default="float32",
                   choices=["float32", "float16", "bfloat16", "int8", "int4", "int4-float16", "int4-bfloat16"],
                   help="graphs: float32; float16 / bfloat16 (for GPUs: weights, activations and KV cache; norms "
                        "fp32); int8 (vision + decoder, for CPUs); int4 (decoder, vision int8; for CPUs); "
                        "int4-float16 / int4-bfloat16 (for GPUs: the float16 / bfloat16 export with the decoder's "
                        "matmul weights in 4 bits)")
    p.add_argument("--int4-block", type=int, default=32, choices=[32, 128],
                   help="int4: weights per quantisation block (32: closer to fp32; 128: smaller)")

    args = parser.parse_args(argv)
    if args.command == "convert":
        from .convert import convert

        convert(args.checkpoint, args.out, template=args.template, force=args.force, dtype=args.dtype,
                int4_block=args.int4_block)


if __name__ == "__main__":
    main()
