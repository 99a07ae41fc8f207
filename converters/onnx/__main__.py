"""``python -m converters.onnx import MODEL.onnx -o MODEL.pth``: an ONNX model as a PyTorch module (onnx2torch),
checked against onnxruntime.

::

    python -m converters.onnx import dsod_tiny.onnx -o dsod_tiny_onnx.pth
    python -m converters.onnx import model.onnx -o model.pth --size height=320 --size width=320

Exit status 0 when the converted module reproduces onnxruntime (max difference <= ``--tolerance`` on every output,
at batch 1 and, with a dynamic batch axis, 2); 1 when it does not; 2 for a file that cannot be read or holds
node types onnx2torch cannot convert (one ``error:`` line naming them all).  Load the result with
``converters.onnx.load_imported(path)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from converters.onnx.importer import (DEFAULT_TOLERANCE, OnnxImportError, ParityError, import_onnx,
                                      save_imported)


def _size(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    try:
        return name, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give NAME=N, got {text!r}") from None


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m converters.onnx", add_help=add_help,
                                description="ONNX models into PyTorch (onnx2torch), checked against onnxruntime.")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="convert an ONNX model into a PyTorch checkpoint")
    imp.add_argument("model", type=Path, help="the .onnx file")
    imp.add_argument("-o", "--output", type=Path, required=True, help="the checkpoint to write (.pth)")
    imp.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                     help=f"largest |PyTorch - onnxruntime| accepted (default {DEFAULT_TOLERANCE:g})")
    imp.add_argument("--size", type=_size, action="append", default=[], metavar="NAME=N",
                     help="the size of a symbolic input axis for the check (a first axis defaults to 1 and 2)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        result = import_onnx(args.model, args.tolerance, dict(args.size))
        size = save_imported(result, args.output, str(args.model))
    except ParityError as exc:
        print(f"error: {args.model}: {exc}", file=sys.stderr)
        return 1
    except OnnxImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"imported {args.model} -> {args.output} ({size / 2**20:.1f} MiB), "
          f"{sum(1 for _ in result.module.graph.nodes)} fx nodes")
    print("inputs:  " + ", ".join(f"{n} {s}" for n, s in result.inputs))
    print("outputs: " + ", ".join(f"{n} {s}" for n, s in result.outputs))
    print("PyTorch (onnx2torch) vs onnxruntime, max |difference| per output:")
    for batch, diffs in result.parity.items():
        print(f"  batch {batch}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
