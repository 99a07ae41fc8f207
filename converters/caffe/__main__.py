"""``python -m converters.caffe``: convert, run and verify Caffe nets; read Caffe solvers as training commands.

Commands::

    convert  NET.prototxt WEIGHTS.caffemodel -o OUT.pth [--train-prototxt T] [--labelmap L] [PREPROCESSING]
    run      NET.prototxt [WEIGHTS] --input IN.npz --out OUT.npz [--blobs a,b] [--backward] [--phase TRAIN] [--fast]
    verify   NET.prototxt [WEIGHTS] --reference REF.npz [--rtol R] [--atol A]
    recipe   SOLVER.prototxt [TRAIN.prototxt] [-o OUT.json]
    detect   NET.prototxt WEIGHTS IMAGE... --out DIR [--train-prototxt T] [--labelmap L] [PREPROCESSING]
             [--score-threshold T] [--output TOP] [--fast]          (or: detect CHECKPOINT.pth IMAGE... --out DIR)
    evaluate NET.prototxt WEIGHTS --dataset NAME [--json OUT.json] [...] (or: evaluate CHECKPOINT.pth --dataset NAME)

PREPROCESSING: [--mean B,G,R] [--scale S] [--input-size WxH] [--interpolation linear|area|nearest|cubic|lanczos4]
[--rgb]; see :mod:`converters.caffe.detect`.

Every failure prints one line, ``error: ...`` naming the file (and the layer),
and exits with status 2; ``verify`` exits with 1 when a blob differs.  The work
is in :mod:`converters.caffe.cli`, :mod:`converters.caffe.recipe` and
:mod:`converters.caffe.detect`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from converters.caffe import cli
from toolkit.caffe.errors import CaffeConversionError
from toolkit.caffe import CaffeFormatError
from toolkit.data.errors import DatasetError

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


def _add_preprocessing(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preprocessing (Caffe's TEST transform; default: the train prototxt's "
                             "transform_param, what the checkpoint stores, the Input layer, Caffe's defaults)")
    g.add_argument("--train-prototxt", type=Path, metavar="TRAIN.prototxt",
                   help="a train or test prototxt: its data layer's transform_param (mean_value, scale, "
                        "resize_param) and label_map_file")
    g.add_argument("--labelmap", type=Path, metavar="FILE", help="Caffe labelmap prototxt: the class names by label")
    g.add_argument("--mean", metavar="B,G,R", help="per-channel mean subtracted, BGR order (or one value)")
    g.add_argument("--scale", type=float, metavar="S", help="multiplier after the mean (DSOD: 0.017)")
    g.add_argument("--input-size", metavar="WxH", help="the size images are warped to (default: the Input layer's)")
    g.add_argument("--interpolation", type=str.lower, choices=("linear", "area", "nearest", "cubic", "lanczos4"),
                   help="the warp's OpenCV interpolation (default LINEAR)")
    g.add_argument("--rgb", action="store_true", help="feed RGB instead of Caffe's BGR (the mean stays B,G,R)")


def _add_detector_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", metavar="TOP", help="the DetectionOutput top to read when the net has several")
    p.add_argument("--fast", action="store_true", help="run the inference-optimized net (same rows up to float "
                                                       "rounding)")


def _flags(args):
    from converters.caffe.detect import hints_from_flags

    return hints_from_flags(args.mean, args.scale, args.input_size, args.interpolation, args.rgb)


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
    _add_preprocessing(p)
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

    p = sub.add_parser("detect", help="run a converted SSD-style detector on images: drawings + detections.json",
                       usage=f"{PROG} detect NET.prototxt WEIGHTS IMAGE... --out DIR [options]\n"
                             f"       {PROG} detect CHECKPOINT.pth IMAGE... --out DIR [options]",
                       description="Preprocess each image as Caffe's TEST transform does (warp to the net's input "
                                   "size, BGR, minus the mean, times the scale), run the net and read its "
                                   "DetectionOutput top. Writes DIR/<image stem>.png with the boxes drawn and "
                                   "DIR/detections.json: [{image, width, height, detections: [{label, name, score, "
                                   "box_xyxy}]}], boxes in pixels of the original image, in DetectionOutput's row "
                                   "order. WEIGHTS is a .caffemodel or a 'convert' checkpoint; a checkpoint alone "
                                   "holds the net definition (and, when converted with --train-prototxt / "
                                   "--labelmap, the preprocessing and class names).")
    p.add_argument("paths", nargs="+", type=Path, metavar="NET WEIGHTS IMAGE",
                   help="NET.prototxt WEIGHTS IMAGE..., or CHECKPOINT.pth IMAGE...")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    _add_preprocessing(p)
    p.add_argument("--score-threshold", type=float, default=0.0, metavar="T",
                   help="keep detections with score >= T (default 0: every row DetectionOutput gives, after its "
                        "own confidence_threshold)")
    p.add_argument("--draw-threshold", type=float, metavar="T",
                   help="draw detections with score >= T (default: the larger of --score-threshold and 0.3)")
    _add_detector_options(p)
    p.set_defaults(func=_detect)

    p = sub.add_parser("evaluate", help="VOC / COCO AP of a converted SSD-style detector on a dataset",
                       usage=f"{PROG} evaluate NET.prototxt WEIGHTS --dataset NAME [options]\n"
                             f"       {PROG} evaluate CHECKPOINT.pth --dataset NAME [options]",
                       description="Run the net over a dataset's split with its preprocessing and score the "
                                   "detections with toolkit.evaluation (VOC07 / VOC12 AP; COCO AP for COCO). The "
                                   "net's classes (--labelmap, the train prototxt's label_map_file or the "
                                   "checkpoint's) are matched to the dataset's by name.")
    p.add_argument("paths", nargs="+", type=Path, metavar="NET WEIGHTS", help="NET.prototxt WEIGHTS, or CHECKPOINT.pth")
    p.add_argument("--dataset", required=True,
                   help="a dataset name toolkit.train accepts: voc07, voc0712, coco, shapes, lmdb:PATH[,...] ...")
    p.add_argument("--split", choices=("test", "train"), default="test", help="which split (default test)")
    p.add_argument("--data-root", type=Path, help="data root (default $TOOLKIT_DATA or ./data)")
    _add_preprocessing(p)
    p.add_argument("--metric", choices=("voc07", "voc12"), default="voc07", help="VOC metric (default voc07)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes (default 2)")
    _add_detector_options(p)
    p.add_argument("--json", type=Path, metavar="OUT.json", help="write metric, mAP and per-class AP here")
    p.add_argument("--plot", type=Path, metavar="PR.png", help="write precision-recall curves here")
    p.set_defaults(func=_evaluate)
    return parser


def _warn(messages: Sequence[str]) -> None:
    for message in messages:
        print(f"warning: {cli.one_line(message)}", file=sys.stderr)


def _shapes(shapes) -> str:
    return ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items()) or "-"


def _convert(args) -> int:
    from converters.caffe.detect import CLASSES_KEY, PREPROCESSING_KEY, convert_metadata, describe_hints

    extra, notes = convert_metadata(cli.read_definition(args.net), str(args.net), flags=_flags(args),
                                    train_prototxt=args.train_prototxt, labelmap=args.labelmap)
    _warn(notes)
    r = cli.convert(args.net, args.weights, args.out, phase=args.phase or "TEST", strict=args.strict, extra=extra)
    _warn(r.warnings)
    net = r.net
    size = f"{r.size_bytes / 2**20:.1f} MiB" if r.size_bytes >= 2**20 else f"{r.size_bytes / 2**10:.1f} KiB"
    print(f"converted {args.net} + {args.weights} -> {r.path} ({size})")
    name = f"net {net.name!r}" if net.name else "net"
    print(f"  {name} ({net.phase}): {r.n_layers} layers, {r.n_layers_with_blobs} with weights; "
          f"{r.n_values:,} parameter values in {r.n_blobs} blobs")
    print(f"  inputs:  {_shapes(net.input_shapes)}")
    print(f"  outputs: {', '.join(net.outputs) or '-'}")
    if PREPROCESSING_KEY in extra:
        stored = {k: (v["value"], v["source"]) for k, v in extra[PREPROCESSING_KEY].items()}
        print(f"  stored preprocessing: {describe_hints(stored)}")
    if CLASSES_KEY in extra:
        print(f"  stored class names: {', '.join(extra[CLASSES_KEY])}")
    return 0


def _loaded(args, paths):
    from converters.caffe.detect import load_detector

    net, weights = paths
    loaded = load_detector(net, weights, flags=_flags(args), train_prototxt=args.train_prototxt,
                           labelmap=args.labelmap, output=args.output, fast=args.fast)
    _warn(loaded.notes)
    d = loaded.detector
    print(f"{loaded.source}: DetectionOutput {d.layer.name!r} -> {d.layer.top!r}, {d.num_classes} classes "
          f"(input {d.input_name!r}{', optimized' if d.fast else ''})")
    print(f"  preprocessing: {loaded.preprocessing.describe()}")
    print(f"  class names ({loaded.classes.source}): {', '.join(loaded.classes.names)}")
    return loaded


def _detect(args) -> int:
    from converters.caffe.detect import detect_images, split_net_arguments

    net, weights, images = split_net_arguments(args.paths)
    if not images:
        raise CaffeConversionError("give at least one IMAGE after the net")
    missing = [str(p) for p in images if not p.is_file()]
    if missing:  # before the net is loaded
        raise CaffeConversionError(f"image(s) not found: {', '.join(missing)}")
    loaded = _loaded(args, (net, weights))
    r = detect_images(loaded, images, args.out, score_threshold=args.score_threshold,
                      draw_threshold=args.draw_threshold, progress=sys.stderr.isatty())
    print(f"wrote {len(r.drawings)} drawing(s) and {r.json_path}")
    if r.unreadable:
        raise CaffeConversionError(f"{len(r.unreadable)} image(s) could not be read, left out of "
                                   f"{r.json_path}: {'; '.join(r.unreadable)}")
    return 0


def _evaluate(args) -> int:
    from converters.caffe.detect import evaluate_dataset, split_net_arguments
    from toolkit.evaluation.report import format_table, plot_pr_curves, write_json

    net, weights, rest = split_net_arguments(args.paths)
    if rest:
        raise CaffeConversionError(f"evaluate takes NET WEIGHTS or a checkpoint; unexpected {[str(p) for p in rest]}")
    loaded = _loaded(args, (net, weights))
    r = evaluate_dataset(loaded, args.dataset, split=args.split, data_root=args.data_root, metric=args.metric,
                         batch_size=args.batch_size, workers=args.workers, progress=sys.stderr.isatty())
    _warn(r.notes)
    metric = "coco" if hasattr(r.dataset, "coco") else args.metric
    title = f"{loaded.source} on {args.dataset} ({args.split} split, {len(r.dataset)} images), metric {metric}"
    print(format_table(r.result.ap, r.result.mAP, title))
    if args.plot:
        from toolkit.engine import pr_curves

        plot_pr_curves(pr_curves(r.result), args.plot, f"{args.dataset}: mAP {100 * r.result.mAP:.2f}")
        print(f"wrote {args.plot}")
    if args.json:
        write_json({**r.result.to_json(), "dataset": args.dataset, "split": args.split,
                    "preprocessing": loaded.preprocessing.describe()}, args.json)
        print(f"wrote {args.json}")
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
    except (CaffeConversionError, CaffeFormatError, DatasetError) as exc:
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
