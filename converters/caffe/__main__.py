"""``python -m converters.caffe``: convert, run and verify Caffe nets; read Caffe solvers as training commands.

Commands::

    convert NET.prototxt WEIGHTS.caffemodel -o OUT.pth
    run     NET.prototxt [WEIGHTS] --input IN.npz --out OUT.npz [--blobs a,b] [--backward] [--phase TRAIN] [--fast]
    verify  NET.prototxt [WEIGHTS] --reference REF.npz [--rtol R] [--atol A]
    recipe  SOLVER.prototxt [TRAIN.prototxt] [-o OUT.json]

Every failure prints one line, ``error: ...`` naming the file (and the layer),
and exits with status 2; ``verify`` exits with 1 when a blob differs.  The work
is in :mod:`converters.caffe.cli` and :mod:`converters.caffe.recipe`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from converters.caffe import cli
from converters.caffe.errors import CaffeConversionError
from toolkit.caffe import CaffeFormatError

PROG = "python -m converters.caffe"


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one ``error: ...`` line (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _blob_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give blob names separated by commas")
    return names


def _add_net(p: argparse.ArgumentParser, weights_optional: bool) -> None:
    p.add_argument("net", type=Path, metavar="NET.prototxt", help="the net definition (modern or legacy V1)")
    weights_help = ("a .caffemodel, or a .pth written by 'convert'"
                    + ("; without it every blob comes from the prototxt's fillers (random values)"
                       if weights_optional else ""))
    p.add_argument("weights", type=Path, nargs="?" if weights_optional else None, metavar="WEIGHTS",
                   help=weights_help)
    p.add_argument("--phase", choices=("TEST", "TRAIN"),
                   help="the net state: layer include/exclude rules, BatchNorm statistics (default TEST; "
                        "run --backward on a net whose loss layers are TRAIN-only uses TRAIN)")


def get_args_parser() -> argparse.ArgumentParser:
    """The command-line parser (one sub-command per command)."""
    parser = _Parser(PROG, description="Caffe nets in PyTorch: convert a prototxt + caffemodel, run it on arrays, "
                                       "verify it against real Caffe's blobs, read a solver as a toolkit.train "
                                       "command.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="prototxt + caffemodel -> a PyTorch checkpoint",
                       description="Write the net's definition and weights as a checkpoint that "
                                   "torch.load(OUT, weights_only=True) reads: CaffeNet.checkpoint() (rebuild "
                                   "with CaffeNet.from_checkpoint) plus 'caffe_blobs', {Caffe layer name: "
                                   "[tensors in Caffe blob order]}, sharing the state dict's storage.")
    _add_net(p, weights_optional=False)
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUT.pth", help="the checkpoint to write")
    p.add_argument("--strict", action="store_true",
                   help="caffemodel layers the net lacks are an error (default: ignored, as Caffe does)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("run", help="one forward (and backward) pass on arrays from an .npz",
                       description="Feed the arrays of IN.npz to the net inputs of the same names (the net is "
                                   "sized from their shapes) and write every top blob, float32, keyed by blob "
                                   "name. Without WEIGHTS the blobs come from the prototxt's fillers, so the "
                                   "outputs are those of a randomly initialised net.")
    _add_net(p, weights_optional=True)
    p.add_argument("--input", type=Path, required=True, metavar="IN.npz",
                   help="one array per net input, keyed by input name, Caffe layout (NCHW, BGR images)")
    p.add_argument("--out", type=Path, required=True, metavar="OUT.npz", help="the arrays to write")
    p.add_argument("--blobs", type=_blob_list, metavar="a,b",
                   help="write only these blobs (only the layers they need run)")
    p.add_argument("--backward", action="store_true",
                   help="also write '<input>_grad': the gradient w.r.t. each input of the net's loss, the sum over "
                        "loss tops of loss_weight * sum(top) as Caffe back-propagates it (when the TEST net has no "
                        "loss and the TRAIN net has, the TRAIN net runs, as if --phase TRAIN were given)")
    p.add_argument("--fast", action="store_true",
                   help="run an inference-optimized copy of the net built for the blobs written (BatchNorm/Scale "
                        "folded into convolutions, fused ReLUs, channels_last, dense-block buffers; see "
                        "converters.caffe.optimize): same values up to float rounding; TEST phase, no --backward. "
                        "Fastest with --blobs naming only the outputs wanted")
    p.set_defaults(func=_run)

    p = sub.add_parser("verify", help="compare the net's blobs with stored reference blobs",
                       description="Run the net on the arrays of REF.npz named like net inputs and compare every "
                                   "other array of REF.npz with the blob of that name. A blob passes when "
                                   "|ours - ref| <= atol + rtol * |ref| for every element; a blob the net does "
                                   "not produce fails (Caffe's auto-inserted '<blob>_<layer>_<i>_split_<k>' copies "
                                   "are compared with their blob). 'max rel diff' is over elements whose "
                                   "reference is non-zero. Exit status 1 when a blob fails.")
    _add_net(p, weights_optional=True)
    p.add_argument("--reference", type=Path, required=True, metavar="REF.npz",
                   help="the inputs and the expected blobs, keyed by blob name")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    p.set_defaults(func=_verify)

    p = sub.add_parser("recipe", help="a Caffe solver (+ train net) as a 'python -m toolkit.train' command",
                       description="Read the solver's schedule and the train net's batch size, augmentation, "
                                   "PriorBox and MultiBoxLoss parameters; print the equivalent toolkit.train "
                                   "command and what it cannot express, and write everything as JSON.")
    p.add_argument("solver", type=Path, metavar="SOLVER.prototxt")
    p.add_argument("train", type=Path, nargs="?", metavar="TRAIN.prototxt",
                   help="the train net (default: the solver's train_net / net, relative to the solver)")
    p.add_argument("-o", "--out", type=Path, metavar="OUT.json",
                   help="the preset to write (default: <solver stem>.recipe.json beside the solver)")
    p.set_defaults(func=_recipe)
    return parser


def _warn(messages: Sequence[str]) -> None:
    for message in messages:
        print(f"warning: {cli.one_line(message)}", file=sys.stderr)


def _shapes(shapes) -> str:
    return ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items()) or "-"


def _convert(args) -> int:
    r = cli.convert(args.net, args.weights, args.out, phase=args.phase or "TEST", strict=args.strict)
    _warn(r.warnings)
    net = r.net
    size = f"{r.size_bytes / 2**20:.1f} MiB" if r.size_bytes >= 2**20 else f"{r.size_bytes / 2**10:.1f} KiB"
    print(f"converted {args.net} + {args.weights} -> {r.path} ({size})")
    name = f"net {net.name!r}" if net.name else "net"
    print(f"  {name} ({net.phase}): {r.n_layers} layers, {r.n_layers_with_blobs} with weights; "
          f"{r.n_values:,} parameter values in {r.n_blobs} blobs")
    print(f"  inputs:  {_shapes(net.input_shapes)}")
    print(f"  outputs: {', '.join(net.outputs) or '-'}")
    return 0


def _run(args) -> int:
    r = cli.run(args.net, args.weights, args.input, args.out, blobs=args.blobs, backward=args.backward,
                phase=args.phase, fast=args.fast)
    _warn(r.warnings)
    source = "weights from " + str(args.weights) if args.weights else "blobs from the prototxt's fillers (random)"
    print(f"ran {args.net} ({r.net.phase}, {source}) on {_shapes(r.inputs)}")
    if r.optimized is not None:
        done = ", ".join(f"{k} {v}" for k, v in r.optimized.items() if v and k not in ("layers in the net",
                                                                                         "steps in the plan"))
        print(f"  optimized: {r.optimized['layers in the net']} layers -> {r.optimized['steps in the plan']} steps"
              + (f" ({done})" if done else ""))
    if r.loss is not None:
        print(f"  loss {r.loss:.6g} (sum over {', '.join(r.net.loss_weights)} of loss_weight * sum(top))")
    print(f"wrote {len(r.arrays)} arrays to {r.path}")
    return 0


def _verify(args) -> int:
    r = cli.verify(args.net, args.weights, args.reference, rtol=args.rtol, atol=args.atol,
                   phase=args.phase or "TEST")
    _warn(r.warnings)
    print(f"verify {args.net}" + (f" + {args.weights}" if args.weights else " (fillers)")
          + f" against {args.reference}; inputs {_shapes(r.inputs)}")
    print(cli.format_verify_table(r))
    failed = [row.blob for row in r.rows if not row.passed]
    rule = f"|ours - ref| <= {r.atol:g} + {r.rtol:g} * |ref|"
    if failed:
        print(f"FAIL: {len(failed)} of {len(r.rows)} blobs outside {rule}")
        return 1
    print(f"ok: {len(r.rows)} blobs within {rule}")
    return 0


def _recipe(args) -> int:
    # Imported here: the recipe reads toolkit.data's augmentation (OpenCV, albumentations) and the model builders.
    from converters.caffe.recipe import default_recipe_path, format_recipe, read_recipe, write_recipe

    recipe = read_recipe(args.solver, args.train)
    _warn(recipe.warnings)
    out = args.out if args.out is not None else default_recipe_path(args.solver)
    print(format_recipe(recipe))
    write_recipe(recipe, out)
    print(f"wrote {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 verify found differences, 2 error)."""
    parser = get_args_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (CaffeConversionError, CaffeFormatError) as exc:
        if args.debug:
            raise
        print(f"error: {cli.one_line(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: {args.command}: unexpected {type(exc).__name__}: {cli.one_line(str(exc))} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
