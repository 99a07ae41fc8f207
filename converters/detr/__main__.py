"""``python -m converters.detr``: official Deformable DETR and Sparse DETR checkpoints as toolkit models.

Commands::

    convert OFFICIAL.pth -o OUT.pth
    run     CKPT --input IN.npz --out OUT.npz [--float64]

``convert`` reads an official checkpoint (``weights_only=True``; ``argparse.Namespace``
is the only extra class allowed), builds the architecture its ``args`` describe,
loads every key and writes a toolkit checkpoint.  ``run`` feeds ``images``
``(N, 3, H, W)`` and ``mask`` ``(N, H, W)`` (True on padding) of IN.npz to an
official or toolkit checkpoint and writes every output under the official names
(``pred_logits``, ``pred_boxes``, ``aux_<i>_pred_*``, ``enc_pred_*``, and Sparse DETR's
``enc_aux_<i>_pred_*``, ``backbone_mask_prediction``, ``sparse_token_nums``,
``backbone_topk_proposals``; ThumbDet's ``downsample_input`` and ``srcs_<l>``).  The images
are what the official model takes: RGB normalized with the ImageNet mean and std,
except for ThumbDet models: RGB in [0, 1] (their backbone normalizes the thumbnail).  Errors
are one ``error: ...`` line naming the file and the keys, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

PROG = "python -m converters.detr"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def get_args_parser() -> argparse.ArgumentParser:
    parser = _Parser(PROG, description="Official Deformable DETR, Sparse DETR and ThumbDet checkpoints as toolkit "
                                       "models: convert, run.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("convert", help="an official checkpoint -> a toolkit checkpoint",
                       description="Read an official Deformable DETR, Sparse DETR or ThumbDet checkpoint ({'model', "
                                   "'args', "
                                   "...}) without unpickling arbitrary objects, build the architecture its args "
                                   "describe, load "
                                   "every key, and write a toolkit checkpoint.")
    p.add_argument("checkpoint", type=Path, metavar="OFFICIAL.pth")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUT.pth")
    p.set_defaults(func=_convert)
    p = sub.add_parser("run", help="one forward pass on images from an .npz; every output under the official names",
                       description="Feed IN.npz's 'images' (N, 3, H, W; RGB normalized with the ImageNet mean and "
                                   "std; for ThumbDet models RGB in [0, 1], as the official models take them) and "
                                   "'mask' (N, H, W; True on padding; optional) to the model and write "
                                   "its outputs: pred_logits, pred_boxes (cxcywh normalized), aux_<i>_pred_*, "
                                   "enc_pred_* for two-stage models, Sparse DETR's enc_aux_<i>_pred_*, "
                                   "backbone_mask_prediction, sparse_token_nums, backbone_topk_proposals, and "
                                   "ThumbDet's downsample_input (the thumbnail) and srcs_<l> (backbone features).")
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="an official or a converted checkpoint")
    p.add_argument("--input", type=Path, required=True, metavar="IN.npz")
    p.add_argument("--out", type=Path, required=True, metavar="OUT.npz")
    p.add_argument("--float64", action="store_true", help="run in float64 (the fixtures' precision)")
    p.set_defaults(func=_run)
    return parser


def _convert(args) -> int:
    from converters.detr.checkpoint import model_from_checkpoint, write_toolkit_checkpoint

    model, cfg, _ = model_from_checkpoint(args.checkpoint)
    size = write_toolkit_checkpoint(model, cfg, args.out, str(args.checkpoint))
    # Shared heads appear under several keys: count each storage once.
    n = sum(t.numel() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())
    options = (("box refinement", cfg.with_box_refine), ("two-stage", cfg.two_stage), (f"rho {cfg.rho:g}", cfg.rho),
               ("encoder aux heads", cfg.use_enc_aux_loss), ("eff_query_init", cfg.eff_query_init),
               ("eff_specific_head", cfg.eff_specific_head))
    kind = "+".join(k for k, on in options if on)
    name = "Sparse DETR" if cfg.family == "sparse" else "Deformable DETR"
    if cfg.thumb_scale > 1:
        name = f"ThumbDet {cfg.thumb_scale}x ({cfg.thumb_mode} thumbnail) on {name}"
    print(f"converted {args.checkpoint} -> {args.out} ({size / 2**20:.1f} MiB)")
    print(f"  {name}{' (' + kind + ')' if kind else ''}: {cfg.backbone}, {cfg.num_feature_levels} levels, "
          f"{cfg.enc_layers}+{cfg.dec_layers} layers, {cfg.num_queries} queries, {cfg.num_classes} classes; "
          f"{n:,} values")
    return 0


def _run(args) -> int:
    import torch

    from converters.caffe.cli import read_npz, write_npz
    from toolkit.caffe.errors import CaffeConversionError
    from converters.detr.checkpoint import DETRConversionError, model_from_checkpoint
    from toolkit.models.detr import flatten_outputs

    try:
        arrays = read_npz(args.input)
    except CaffeConversionError as exc:
        raise DETRConversionError(str(exc)) from None
    if "images" not in arrays:
        raise DETRConversionError(f"{args.input}: no 'images' array (it holds {sorted(arrays)})")
    images = arrays["images"]
    if images.ndim != 4 or images.shape[1] != 3:
        raise DETRConversionError(f"{args.input}: 'images' must be (N, 3, H, W), got {images.shape}")
    mask = arrays.get("mask")
    if mask is not None and mask.shape != (images.shape[0], *images.shape[2:]):
        raise DETRConversionError(f"{args.input}: 'mask' must be (N, H, W) = {(images.shape[0], *images.shape[2:])}, "
                                  f"got {mask.shape}")
    model, cfg, _ = model_from_checkpoint(args.checkpoint)
    dtype = torch.float64 if args.float64 else torch.float32
    model = model.to(dtype)
    x = torch.from_numpy(images).to(dtype)
    if cfg.thumb_scale > 1:
        # ThumbDet takes [0, 1] RGB and normalizes after its down-sampler; the toolkit's models all take normalized
        # images and the thumbnailer maps them back to [0, 1] first.
        x = model.backbone[0].down_sample.from_pixels(x)
    with torch.no_grad():
        out = model(x, None if mask is None else torch.from_numpy(mask > 0))
    flat = {k: v.detach().cpu().numpy() for k, v in flatten_outputs(out).items()}
    write_npz(args.out, flat)
    print(f"ran {args.checkpoint} ({'float64' if args.float64 else 'float32'}) on {images.shape[0]} image(s) of "
          f"{images.shape[2]}x{images.shape[3]}; wrote {len(flat)} arrays to {args.out}: "
          f"{', '.join(f'{k} {tuple(v.shape)}' for k, v in list(flat.items())[:2])}, ...")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 error)."""
    from converters.detr.checkpoint import DETRConversionError

    parser = get_args_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "float64", False):
        # The official code computes some values in float32 whatever the model's dtype (the two-stage proposals'
        # log), and MKL rounds float32 log differently on different CPUs (its CPU-specific code paths: the official
        # fixtures' values come from its generic path).  --float64 is the reference regime: ask MKL for its
        # reproducible path (MKL_CBWR, read at MKL's first call; slower matrix products).
        os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
    try:
        return args.func(args)
    except DETRConversionError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: {args.command}: unexpected {type(exc).__name__}: {exc} (rerun with --debug)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
