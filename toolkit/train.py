"""Train a detector: the SSD family from scratch (SSD / DSOD heads, or the GFL-style head of ``gfl_*``), or the DETR
family (Deformable DETR, Sparse DETR).

::

    python -m toolkit.train --dataset shapes --model dsod_tiny --out runs/shapes
    python -m toolkit.train --dataset voc0712 --model dsod300 --batch-size 4 --accum 4 --out runs/dsod300
    torchrun --nproc_per_node 8 -m toolkit.train --dataset voc0712 --model dsod300 --batch-size 4 --accum 4
    python -m toolkit.train --dataset voc07 --model dsod300 --init-from dsod300_converted.pth --lr 0.01
    python -m toolkit.train --dataset coco --model sparse_detr --rho 0.3 --out runs/sparse_detr
    python -m toolkit.train --dataset shapes --model deformable_detr_tiny --out runs/ddetr_tiny
    python -m toolkit.train --dataset shapes --model deformable_detr_tiny --aux-dense-head --out runs/ddetr_dense
    python -m toolkit.train --dataset shapes --model deformable_detr_dsod --backbone-weights runs/main/checkpoint.pth \
        --lr-backbone 2e-5 --aux-dense-head --iters 3200 --out runs/ddetr_dsod30
    python -m toolkit.train --dataset shapes --model gfl_dsod_tiny --amp --cache-images --workers 0 --out runs/gfl
    python -m toolkit.train --dataset shapes --model gfl_dsod_nano --distill ld --teacher runs/gfl/checkpoint.pth
    python -m toolkit.train --dataset shapes --model dsod_nano --distill frs --teacher runs/main/checkpoint.pth

The ``gfl_*`` presets (``toolkit.models.gfl``) read the data as the SSD family does and train with GFL's loss
(ATSS assignment, quality focal, distribution focal and GIoU losses); their evaluations use GFL's post-processing
(score threshold 0.05, 1,000 locations per level, NMS at IoU 0.6, 100 detections per image).

DETR presets (``toolkit.models.detr.training``) follow the official recipe: AdamW
with the backbone and the sampling-offset projections at their own learning
rates, gradient clipping, a step drop of the learning rate, DETR's random
resize / crop / flip augmentation and padded batches.  Options from later DETRs,
off in the presets and absent at inference: ``--aux-dense-head`` (Co-DETR's
dense one-to-many head on the encoder), ``--num-queries-one2many`` (H-DETR's
hybrid matching) and ``--look-forward-twice``.  The ``*_dsod`` CPU presets put
``dsod_tiny``'s backbone under the DETR, which ``--backbone-weights`` takes from a
trained ``dsod_tiny`` checkpoint (the stand-in for the official pretrained ResNet).

Solver presets reproduce the Caffe solvers (``SOLVERS``): SGD with momentum 0.9,
weight decay 5e-4, a multistep schedule (gamma 0.1) and Caffe's ``iter_size``
as ``--accum``. Flags override preset fields. With ``--epochs`` the preset's
steps are scaled to the new length (they are fractions of ``max_iter`` in
Caffe's schedule).

One iteration is one optimizer step (``batch_size * accum`` images per process).
Gradients of accumulated micro-batches and of DDP ranks are averaged, each loss
normalized by its own number of matches, as Caffe's ``iter_size`` and
multi-GPU training did; a single process with ``--accum N`` therefore takes the
same steps as ``N`` processes with ``--accum 1``.

``--distill`` trains the student with a frozen ``--teacher``: ThumbDet (``toolkit.distill.thumbdet``; a student
behind a thumbnail), LD and Self-LD (``toolkit.distill.ld``; GFL heads) or FRS (``toolkit.distill.frs``; SSD or
GFL heads).

The run folder gets ``checkpoint.pth`` (atomic, resumable with ``--resume``),
TensorBoard logs under ``tb/``, ``history.json``, and at the end ``report.md``,
``loss.png``, ``pr_curves.png`` and ``metrics.json`` (final VOC07 mAP).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from toolkit.data import DATASETS, DatasetError, build_dataset
from toolkit.data.transforms import (
    PREPROCESS_PRESETS,
    SSD_BATCH_SAMPLERS,
    ExpandParams,
    RandomMirror,
    SSDTestTransform,
    SSDTrainTransform,
    collate_detection,
)
from toolkit.engine import (
    AugmentedDataset,
    DistInfo,
    EpochSampler,
    InMemoryDataset,
    NonFiniteLossError,
    add_ssd_thumbnail,
    evaluate_detector,
    init_distributed,
    keep_freed_memory,
    load_trained_model,
    normalized_targets,
    pr_curves,
)
from toolkit.evaluation.report import format_table, plot_pr_curves, write_json
from toolkit.models.build import GFL_MODELS, INPUTS, MODELS, build_model, default_postprocess
from toolkit.models.caffe_import import init_from_checkpoint
from toolkit.models.detr.training import DETR_PRESETS
from toolkit.models.gfl import GFLLoss, GFLPostprocessParams, gfl_loss, gfl_targets, predict_gfl
from toolkit.models.layers import guard_strided_convs
from toolkit.models.multibox_loss import MultiBoxLoss, MultiBoxLossParams
from toolkit.models.postprocess import NMS_KINDS
from toolkit.models.state_dict import state_dict_mismatch
from toolkit.models.thumbnail import THUMB_INITS, THUMB_MODES, find_thumbnailer

DISTILL_METHODS = ("thumbdet", "ld", "frs")


@dataclass(frozen=True)
class SolverPreset:
    """A Caffe solver: ``steps`` and ``max_iter`` in iterations; batch per process."""

    base_lr: float
    steps: tuple[int, ...]
    max_iter: int
    batch_size: int
    accum: int = 1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gamma: float = 0.1
    warmup_iters: int = 0
    augment: str = "ssd"
    # DETR recipe: AdamW with parameter groups, gradient clipping, epochs-based length and lr drop.
    optimizer: str = "sgd"
    lr_backbone: float = 0.0
    lr_linear_proj_mult: float = 1.0
    clip_max_norm: float = 0.0
    epochs: float = 0.0       # > 0: max_iter and steps are set from the epoch length
    step_epochs: tuple[float, ...] = ()


SOLVERS: dict[str, SolverPreset] = {
    # dsod300_voc0712/solver.prototxt: lr 0.1, steps 20k..80k, max 100k, iter_size 4, batch 4 (x8 GPUs = 128).
    "dsod300": SolverPreset(0.1, (20000, 40000, 60000, 80000), 100000, batch_size=4, accum=4),
    # grp_dsod320_voc0712/solver.prototxt: lr 0.1, steps 20k..80k, max 100k, iter_size 3, batch 6.
    "grp_dsod320": SolverPreset(0.1, (20000, 40000, 60000, 80000), 100000, batch_size=6, accum=3),
    "grp_dsod_tiny": SolverPreset(0.05, (1200, 1650), 1900, batch_size=24, warmup_iters=100),
    # ssd300_vgg16_voc0712/solver.prototxt: lr 0.001, steps 80k/100k/120k, max 120k, batch 8 (x4 GPUs = 32).
    "ssd300": SolverPreset(0.001, (80000, 100000, 120000), 120000, batch_size=8),
    "ssd_tiny": SolverPreset(0.01, (1200, 1650), 1900, batch_size=24, warmup_iters=200),
    # The CPU preset for the shapes dataset (the README's main job: make run adds --amp --cache-images
    # --workers 0): batch 16 at lr 0.2 x 16 / 24 for 4,800 iterations (9.6 epochs), VOC07 mAP 0.812 after 773 s of
    # training on 2 cores (2026-12-06).  Until then batch 24 x 2,700 at lr 0.2 (steps 2,100 / 2,500, the same
    # fractions): 0.810 on one machine, 0.761-0.782 on another (README, "The main job"; bench/RESULTS.md, "make run").
    "dsod_tiny": SolverPreset(0.2 * 16 / 24, (3733, 4444), 4800, batch_size=16, warmup_iters=100, augment="mirror"),
    # The GFL head on the same backbones (toolkit.models.gfl).  gfl_dsod_tiny: dsod_tiny's recipe until 2026-12-06
    # (batch 24 x 2,700), VOC07 mAP 0.802 (one seed at dsod_tiny's batch 16 x 4,050: 0.801, the SSD head 0.815)
    # (--amp --cache-images --workers 0, OMP_NUM_THREADS=1 beside another training job: 1,643 s); 400-iteration
    # runs reached 0.34 against dsod_tiny's 0.14, and predictors without BatchNorm diverged at lr 0.1.
    # gfl_dsod300: DSOD300's solver with GFL's 500-iteration linear warm-up (not run here).
    "gfl_dsod_tiny": SolverPreset(0.2, (2100, 2500), 2700, batch_size=24, warmup_iters=100, augment="mirror"),
    "gfl_dsod300": SolverPreset(0.1, (20000, 40000, 60000, 80000), 100000, batch_size=4, accum=4, warmup_iters=500),
}
# The distillation students (issue 15's figures): the recipe their figures were measured with, gfl_dsod_tiny's
# (dsod_tiny's until 2026-12-06: batch 24, 2,700 iterations).
SOLVERS["dsod_nano"] = SOLVERS["gfl_dsod_nano"] = SOLVERS["gfl_dsod_tiny"]
# Deformable DETR's main.py defaults (Sparse DETR keeps them): AdamW lr 2e-4, backbone 2e-5, offsets x0.1, weight
# decay 1e-4, clip 0.1, batch 2, 50 epochs, lr / 10 after 40.
_DETR_SOLVER = SolverPreset(2e-4, (), 0, batch_size=2, weight_decay=1e-4, augment="detr", optimizer="adamw",
                            lr_backbone=2e-5, lr_linear_proj_mult=0.1, clip_max_norm=0.1, epochs=50,
                            step_epochs=(40,))
SOLVERS.update({name: _DETR_SOLVER for name in DETR_PRESETS})
# The tiny presets train their backbone from scratch: at the full learning rate.
_DETR_TINY_SOLVER = replace(_DETR_SOLVER, batch_size=4, epochs=12, step_epochs=(10,), lr_backbone=2e-4)
SOLVERS["deformable_detr_tiny"] = SOLVERS["sparse_detr_tiny"] = _DETR_TINY_SOLVER
# From scratch too by default; a backbone from a trained dsod_tiny takes the official 0.1x (--lr-backbone 2e-5).
SOLVERS["deformable_detr_dsod"] = SOLVERS["sparse_detr_dsod"] = _DETR_TINY_SOLVER


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m toolkit.train", description=__doc__.split("\n\n")[0], add_help=add_help)
    p.add_argument("--dataset", default="shapes", help=f"one of {sorted(DATASETS)} (default shapes)")
    p.add_argument("--model", default="dsod_tiny", choices=sorted(set(MODELS) | set(DETR_PRESETS)))
    p.add_argument("--data-root", type=Path, help="data root (default $TOOLKIT_DATA or ./data)")
    p.add_argument("--batch-size", type=int, help="images per process and micro-batch")
    p.add_argument("--accum", type=int, help="micro-batches per step (Caffe iter_size)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, help="train this many epochs (steps scaled)")
    g.add_argument("--iters", type=int, help="train this many iterations (steps scaled)")
    p.add_argument("--lr", type=float, help="base learning rate (DETR: the backbone's rate keeps its ratio "
                   "to it)")
    p.add_argument("--lr-backbone", type=float, help="DETR: the backbone's learning rate (default: the preset's, "
                   "scaled with --lr)")
    p.add_argument("--steps", type=int, nargs="*", help="multistep milestones (iterations)")
    p.add_argument("--gamma", type=float, help="multistep factor")
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-iters", type=int, help="linear warm-up iterations")
    p.add_argument("--rho", type=float, help="Sparse DETR: share of encoder tokens updated (default: preset)")
    p.add_argument("--with-box-refine", action=argparse.BooleanOptionalAction, default=None,
                   help="DETR: iterative box refinement (default: preset)")
    p.add_argument("--two-stage", action=argparse.BooleanOptionalAction, default=None,
                   help="DETR: two-stage queries from encoder proposals (default: preset)")
    p.add_argument("--num-queries-one2many", type=int,
                   help="Deformable DETR: H-DETR's hybrid matching, this many extra training-only queries matched "
                        "one-to-many (H-DETR: 5x the queries; default: preset, 0 = off)")
    p.add_argument("--k-one2many", type=int, default=6,
                   help="hybrid matching: copies of each target the extra queries match (default 6, H-DETR's)")
    p.add_argument("--lambda-one2many", type=float, default=1.0,
                   help="hybrid matching: weight of the one-to-many losses (default 1, H-DETR's)")
    p.add_argument("--look-forward-twice", action=argparse.BooleanOptionalAction, default=None,
                   help="Deformable DETR with box refinement: each layer's box loss also trains the previous layer's "
                        "box head (H-DETR's option; default: preset)")
    p.add_argument("--aux-dense-head", action=argparse.BooleanOptionalAction, default=None,
                   help="DETR: Co-DETR's auxiliary dense head in training (a GFL head with ATSS on the encoder's "
                        "output maps plus one stride-2 level; dense one-to-many supervision of backbone and encoder; "
                        "not run at inference; default: preset)")
    p.add_argument("--aux-dense-weight", type=float,
                   help="DETR: weight of the auxiliary dense head's GFL loss (default: 2 x the decoder layers, "
                        "Co-DETR's num_dec_layer x lambda_2)")
    p.add_argument("--backbone-weights", type=Path,
                   help="DETR: a local file to start the backbone from (nothing is downloaded): a torchvision "
                        "ResNet state dict for the ResNet presets; for the *_dsod presets, a toolkit checkpoint of "
                        "dsod_tiny (e.g. the main job's runs/main/checkpoint.pth)")
    p.add_argument("--augment", choices=("ssd", "light", "mirror", "detr"),
                   help="ssd: the full SSD recipe; light: warp (random interpolation) and mirror; mirror: the test "
                        "transform's warp and a random mirror, so --cache-images keeps warped images (short CPU "
                        "runs). Default: preset")
    p.add_argument("--max-expand", type=float, default=4.0,
                   help="SSD expand augmentation: largest zoom-out ratio (Caffe recipe 4; 1 disables expand)")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC activations (default on; dsod_tiny training steps were 1.7x faster with it on the CPU)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA only)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    p.add_argument("--cache-images", action="store_true",
                   help="decode every training image once and keep it in memory (small datasets, few cores)")
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="run folder")
    p.add_argument("--init-from", type=Path,
                   help="initial weights: a Caffe model converted by 'python -m converters.caffe convert' (loaded "
                        "through the model's rename table) or a toolkit.train checkpoint; a class head (SSD's "
                        "confidence convolutions, GFL's class predictors) for another number of classes is left at "
                        "its initialisation")
    p.add_argument("--resume", nargs="?", const="auto", help="checkpoint to resume (default: <out>/checkpoint.pth)")
    d = p.add_argument_group("distillation (a frozen --teacher checkpoint teaches the student, --model)")
    d.add_argument("--distill", choices=DISTILL_METHODS,
                   help="thumbdet: the student (--model, started from the teacher's weights) sees a --thumb-scale "
                        "times smaller image; the first --downsample-phase of the run trains the down-sampler alone "
                        "(down-sample loss), the rest the whole student with the task loss, KD and FM.  "
                        "ld: localization distillation (gfl_* student and teacher: LD on the positives and the "
                        "valuable localization region, KD of the class scores; Self-LD: a teacher of the student's "
                        "own --model).  frs: feature-richness distillation (SSD or GFL heads, the teacher's head of "
                        "the same kind: features and class scores weighted by the teacher's class probabilities)")
    d.add_argument("--teacher", type=Path,
                   help="the frozen teacher, a toolkit.train checkpoint (DETR: or a converters.detr one). thumbdet: "
                        "the full-size --model; ld / frs: any preset with the student's levels on the same input "
                        "size and preprocessing (e.g. gfl_dsod_tiny for gfl_dsod_nano)")
    d.add_argument("--thumb-scale", type=int, choices=(1, 2, 4), default=4,
                   help="thumbnail scale (default 4, ThumbDet's; 1: the full-size model with the same schedule)")
    d.add_argument("--thumb-mode", choices=THUMB_MODES, default="learned",
                   help="learned: ThumbDet's down-sampler; bicubic: the baseline, an antialiased bicubic resize; "
                        "bicubic_aliased: the same without anti-aliasing, as cv2.INTER_CUBIC (nothing to learn in "
                        "either: the down-sampler phase is skipped)")
    d.add_argument("--thumb-init", choices=THUMB_INITS, default="default",
                   help="the learned down-sampler's start: default (PyTorch's initialisation, as officially) or "
                        "antialias (a binomial low-pass filter at its stride, Thumbnailer.init_antialias)")
    d.add_argument("--downsample-phase", type=float, default=0.1,
                   help="share of the iterations that train the down-sampler alone (default 0.1: the paper's 5 of 50 "
                        "epochs)")
    d.add_argument("--downsample-weight", type=float, default=1.0, help="down-sample loss weight (default 1)")
    d.add_argument("--downsample-lr", type=float, default=1e-3,
                   help="SSD family: the learned down-sampler's Adam learning rate, on the detector's schedule "
                        "(default 1e-3; the DETR family's AdamW trains it with the backbone, as officially)")
    d.add_argument("--kd-weight", type=float, default=0.5, help="KD loss weight (default 0.5)")
    d.add_argument("--fm-weight", type=float, default=0.1, help="feature-map loss weight (default 0.1)")
    d.add_argument("--ld-temperature", type=float, default=10.0, help="LD's temperature (default 10)")
    d.add_argument("--ld-weight", type=float, default=0.25, help="LD term on the positives (default 0.25)")
    d.add_argument("--ld-vlr-weight", type=float, default=0.25,
                   help="LD term on the valuable localization region (default 0.25; 0 leaves it out)")
    d.add_argument("--ld-kd-weight", type=float, default=1.0,
                   help="LD's KD of the class scores at the positives, temperature 2 (default 1; LD's head has 10 "
                        "for COCO's 80 classes, over which its KL is averaged: on shapes' 6 it collapsed a "
                        "gfl_dsod_nano student to 0.125 VOC07 mAP at 800 iterations, against 0.453 with 1)")
    d.add_argument("--frs-feat-weight", type=float,
                   help="FRS feature term (default: FRS's 0.1 for GFL heads, 0.005 for SSD heads)")
    d.add_argument("--frs-cls-weight", type=float,
                   help="FRS classification term (default: FRS's 0.05 for GFL heads, 0.02 for SSD heads)")
    d.add_argument("--frs-warmup", type=int, default=500,
                   help="FRS's linear ramp of both terms over the first N iterations (default 500)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N iterations (0: at the end only)")
    p.add_argument("--nms", choices=NMS_KINDS, default="greedy",
                   help="the evaluations' NMS, SSD family: greedy (Caffe's DetectionOutput, default; the gfl_* "
                        "presets: per class at IoU 0.6) or voting_cluster_diou (LD's score-voting cluster DIoU-NMS "
                        "at IoU 0.6 over all classes)")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N iterations (0: every epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# --------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class Plan:
    """What the run will do, resolved from preset + flags."""

    solver: SolverPreset
    total_iters: int
    iters_per_epoch: int


def resolve_plan(args, solver: SolverPreset, train_len: int, world: int) -> Plan:
    fields = {k: getattr(args, k) for k in ("batch_size", "accum", "momentum", "weight_decay", "gamma",
                                             "warmup_iters") if getattr(args, k) is not None}
    if args.lr is not None:
        fields["base_lr"] = args.lr
        # The DETR recipes' backbone rate keeps its ratio to the base rate (official: 2e-5 for 2e-4).
        fields["lr_backbone"] = solver.lr_backbone * args.lr / solver.base_lr
    if args.lr_backbone is not None:
        if solver.optimizer != "adamw":
            raise ValueError("--lr-backbone applies to the DETR family's recipes")
        fields["lr_backbone"] = args.lr_backbone
    solver = replace(solver, **fields)
    iters_per_epoch = train_len // (solver.batch_size * solver.accum * world)
    if iters_per_epoch < 1:
        raise ValueError(f"{train_len} training images are fewer than one step of "
                         f"{solver.batch_size} x {solver.accum} x {world} process(es)")
    if solver.epochs:  # DETR recipes are written in epochs
        solver = replace(solver, max_iter=max(1, round(solver.epochs * iters_per_epoch)),
                         steps=tuple(round(e * iters_per_epoch) for e in solver.step_epochs))
    if args.iters is not None:
        total = args.iters
    elif args.epochs is not None:
        total = max(1, round(args.epochs * iters_per_epoch))
    else:
        total = solver.max_iter
    if args.steps is not None:
        steps = tuple(args.steps)
    else:
        steps = tuple(round(s * total / solver.max_iter) for s in solver.steps)
    solver = replace(solver, steps=steps, max_iter=total)
    return Plan(solver, total, iters_per_epoch)


def lr_factor(iteration: int, solver: SolverPreset) -> float:
    """Caffe ``multistep`` (``gamma ** #steps passed``) times a linear warm-up."""
    factor = solver.gamma ** sum(iteration >= s for s in solver.steps)
    if solver.warmup_iters and iteration < solver.warmup_iters:
        factor *= (iteration + 1) / solver.warmup_iters
    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary file, then rename: a killed run keeps the last good checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _jsonable_args(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _float_tree(value):
    """Nested dicts / lists / tuples of tensors with every floating tensor cast to float32 (autocast outputs)."""
    if isinstance(value, dict):
        return {k: _float_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_float_tree(v) for v in value)
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.float()
    return value


# ----------------------------------------------------------------------------- run
class Trainer:
    def __init__(self, args, dist_info: DistInfo) -> None:
        self.args = args
        self.dist = dist_info
        cuda = args.device == "cuda"
        self.device = torch.device("cuda", dist_info.local_rank) if cuda else torch.device(args.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        seed_everything(args.seed)
        preset = SOLVERS.get(args.model)
        if preset is None:
            raise KeyError(f"no solver preset for model {args.model!r}")
        self.is_detr = args.model in DETR_PRESETS
        # The GFL-head presets: the SSD family's data and backbones, GFL's loss and post-processing.
        self.is_gfl = args.model in GFL_MODELS
        self.model_config = None
        if args.distill is None and args.teacher is not None:
            raise ValueError(f"--teacher needs --distill ({' | '.join(DISTILL_METHODS)})")
        if args.distill == "thumbdet" and self.is_gfl:
            raise ValueError(f"--distill thumbdet: {args.model} has a GFL head; ThumbDet is for the SSD and DETR "
                             "heads")
        if args.distill != "thumbdet" and args.thumb_init != "default":
            raise ValueError(f"--thumb-init {args.thumb_init} is for --distill thumbdet's learned down-sampler")
        if args.distill == "thumbdet" and args.init_from:
            raise ValueError("--distill thumbdet starts the student from the teacher's weights: drop --init-from")
        if args.distill == "ld" and not self.is_gfl:
            raise ValueError(f"--distill ld distils box-edge distributions: the student needs a GFL head "
                             f"(gfl_* presets), not {args.model}")
        if args.distill == "frs" and self.is_detr:
            raise ValueError(f"--distill frs is for the SSD family and the GFL head, not {args.model}")
        if args.num_queries_one2many and not self.is_detr:
            raise ValueError(f"--num-queries-one2many (hybrid matching) is for Deformable DETR, not {args.model}")
        if self.is_detr:
            model, s = self._setup_detr(args, preset, dist_info)
        else:
            model, s = self._setup_ssd(args, preset, dist_info)
        self._setup_distill(args, model)
        model = model.to(self.device)
        if args.amp and self.device.type == "cpu":
            guard_strided_convs(model)  # a CPU bfloat16 weight-gradient bug on one-pixel outputs (see layers)
        if args.sync_bn:
            if self.device.type != "cuda":
                raise ValueError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run on the CPU")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if args.channels_last and not self.is_detr:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            # DETR: heads some steps leave out; ThumbDet's first phase trains the down-sampler alone.
            find_unused_parameters=self.is_detr or self.teacher is not None,
        ) if dist_info.enabled else model
        self.adaptation_ddp = None
        if self.adaptation is not None:
            self.adaptation = self.adaptation.to(self.device)
            self.adaptation_ddp = torch.nn.parallel.DistributedDataParallel(
                self.adaptation, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            ) if dist_info.enabled else self.adaptation
        self.thumb_optimizer = None
        if s.optimizer == "adamw":
            from toolkit.models.detr.training import param_groups

            groups = param_groups(model, s.base_lr, s.lr_backbone, s.lr_linear_proj_mult)
            # The fused kernel: the same update in one pass over every tensor (the tiny DETR's step on 2 CPU threads:
            # 11 ms instead of 54 ms for the per-tensor loop).
            self.optimizer = torch.optim.AdamW(groups, lr=s.base_lr, weight_decay=s.weight_decay, fused=True)
        else:
            # ThumbDet trains its down-sampler with AdamW (lr 2e-5, with the backbone).  Under the SSD family's SGD
            # its loss (images / 255, squared) is too small to move it in the first phase, and in the second the
            # task loss at SGD's rates drives it off image-like outputs (a single saturated channel, 40x white):
            # the down-sampler keeps an Adam of its own, on the same schedule.
            thumbnailer = find_thumbnailer(model) if self.learns_thumbnail else None
            own = set(thumbnailer.parameters()) if thumbnailer is not None else set()
            # FRS's adaptation layer trains with the student (FRS: a neck of the student's detector).
            params = [p for p in model.parameters() if p not in own]
            if self.adaptation is not None:
                params += list(self.adaptation.parameters())
            self.optimizer = torch.optim.SGD(params, lr=s.base_lr, momentum=s.momentum, weight_decay=s.weight_decay)
            if own:
                self.thumb_optimizer = torch.optim.Adam(thumbnailer.parameters(), lr=args.downsample_lr)
        self.optimizers = [self.optimizer] + ([self.thumb_optimizer] if self.thumb_optimizer is not None else [])
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda it: lr_factor(it, s)) for o in self.optimizers]
        self.scheduler = self.schedulers[0]
        self.scaler = torch.amp.GradScaler("cuda", enabled=args.amp and self.device.type == "cuda")
        self.iteration = 0
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.out: Path = args.out
        self.writer = None
        if dist_info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"))
        if args.resume:
            self._resume(self.out / "checkpoint.pth" if args.resume == "auto" else Path(args.resume))
        if self.teacher is not None and not self.learns_thumbnail and self.iteration == 0 and self.phase1_iters:
            # Bicubic thumbnails and the full-size model have no down-sampler to train: they start where the learned
            # thumbnail's second phase starts, with the same learning rate and the same batches from then on.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
                for _ in range(self.phase1_iters):
                    for scheduler in self.schedulers:
                        scheduler.step()
            self.iteration = self.phase1_iters
            if dist_info.is_main:
                print(f"--thumb-scale {args.thumb_scale} --thumb-mode {args.thumb_mode}: no down-sampler to train; "
                      f"starting at iteration {self.iteration}, where the learned thumbnail's second phase starts")

    def _data(self, args, train_base, transform, test_transform, collate, dist_info: DistInfo) -> None:
        """The training set (optionally cached, augmented per sample), its sampler, the collation and the test set."""
        if args.cache_images:
            train_base = InMemoryDataset(train_base, progress=dist_info.is_main and not args.no_progress)
        self.train_set = AugmentedDataset(train_base, transform, args.seed)
        self.sampler = EpochSampler(len(train_base), self.plan.solver.batch_size, True, args.seed, dist_info.rank,
                                    dist_info.world)
        self.collate = collate
        self.test_set = None
        if DATASETS[args.dataset].test is not None:
            self.test_set = build_dataset(args.dataset, "test", root=args.data_root, transform=test_transform)

    def _setup_ssd(self, args, preset: SolverPreset, dist_info: DistInfo):
        """Datasets, transforms, model and loss of the SSD family; returns ``(model, solver)``."""
        spec = INPUTS[args.model]
        preprocess = PREPROCESS_PRESETS[spec.preprocess]
        size = spec.size
        root = args.data_root
        augment = args.augment or preset.augment
        if augment == "detr":
            raise ValueError("--augment detr is for the DETR family")
        # mirror: the deterministic warp belongs to the dataset (and to the image cache).
        train_base = build_dataset(args.dataset, "train", root=root,
                                   transform=SSDTestTransform(size, preprocess) if augment == "mirror" else None)
        self.classes = train_base.classes
        self.plan = resolve_plan(args, preset, len(train_base), dist_info.world)
        s = self.plan.solver
        if args.max_expand < 1:
            raise ValueError(f"--max-expand must be >= 1, got {args.max_expand}")
        expand = ExpandParams(0.5, args.max_expand) if args.max_expand > 1 else None
        if augment == "mirror":
            transform = RandomMirror()
        elif augment == "light":
            # Warp + mirror only: the SSD recipe's distortion, expand and crops slow down short runs.
            transform = SSDTrainTransform(size, preprocess, distort=None, expand=None, samplers=SSD_BATCH_SAMPLERS[:1])
        else:
            transform = SSDTrainTransform(size, preprocess, expand=expand)
        self._data(args, train_base, transform, SSDTestTransform(size, preprocess), collate_detection, dist_info)
        model = build_model(args.model, len(self.classes))
        if args.distill == "thumbdet":
            add_ssd_thumbnail(model, args.model, args.thumb_scale, args.thumb_mode)
        if args.init_from:
            for note in init_from_checkpoint(model, load_checkpoint(args.init_from), str(args.init_from)):
                if dist_info.is_main:
                    print(f"--init-from: {note}")
        if self.is_gfl:
            self.criterion = GFLLoss()
            self.post = None
            self.predict_fn = partial(predict_gfl, params=GFLPostprocessParams(nms=args.nms))
            self.loss_keys = ("loss", "loss_cls", "loss_box", "loss_dfl")
            return model, s
        self.criterion = MultiBoxLoss(MultiBoxLossParams(num_classes=len(self.classes)))
        self.post = replace(default_postprocess(len(self.classes)), nms=args.nms)
        self.predict_fn = None
        self.loss_keys = ("loss", "loss_box", "loss_cls")
        return model, s

    def _setup_detr(self, args, preset: SolverPreset, dist_info: DistInfo):
        """Datasets, DETR augmentation, model and set criterion of the DETR family; returns ``(model, solver)``."""
        from toolkit.data.detr_transforms import DETRTestTransform, DETRTrainTransform, collate_padded
        from toolkit.models.detr.criterion import SetCriterion, default_weight_dict
        from toolkit.models.detr.matcher import HungarianMatcher
        from toolkit.models.detr.training import build_detr_model, detr_predict, preset_config

        if (args.augment or preset.augment) != "detr":
            raise ValueError("the DETR family trains with --augment detr")
        sizes = DETR_PRESETS[args.model]
        root = args.data_root
        train_base = build_dataset(args.dataset, "train", root=root)
        self.classes = train_base.classes
        self.plan = resolve_plan(args, preset, len(train_base), dist_info.world)
        s = self.plan.solver
        transform = DETRTrainTransform(sizes.train_scales, sizes.max_size, sizes.crop_scales, sizes.crop_min,
                                       sizes.crop_max)
        self._data(args, train_base, transform, DETRTestTransform(sizes.test_scale, sizes.max_size), collate_padded,
                   dist_info)
        cfg = preset_config(args.model, len(self.classes) - 1, rho=args.rho, with_box_refine=args.with_box_refine,
                            two_stage=args.two_stage, num_queries_one2many=args.num_queries_one2many,
                            look_forward_twice=args.look_forward_twice, aux_dense_head=args.aux_dense_head)
        if args.distill == "thumbdet":
            cfg = replace(cfg, thumb_scale=args.thumb_scale, thumb_mode=args.thumb_mode)
        from dataclasses import asdict

        self.model_config = asdict(cfg)
        model = build_detr_model(cfg, args.backbone_weights)
        if args.init_from:
            init = load_checkpoint(args.init_from)
            if not isinstance(init, dict) or "model" not in init:
                raise ValueError(f"{args.init_from}: not a DETR checkpoint (toolkit.train's or converters.detr's)")
            own = model.state_dict()
            # Tensors of another shape (a class head for another label set) keep their initialisation.
            fitting = {k: v for k, v in init["model"].items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
            model.load_state_dict(fitting, strict=False)
            if dist_info.is_main:
                refit = sorted({k.split(".")[0] for k in own if k not in fitting})
                print(f"--init-from {args.init_from}: {len(fitting)} of {len(own)} tensors loaded; left at their "
                      f"initialisation: {refit or 'none'} ({len(set(init['model']) - set(own))} ignored)")
        self.criterion = SetCriterion(cfg.num_classes, HungarianMatcher(2.0, 5.0, 2.0),
                                      default_weight_dict(cfg.dec_layers, enc_layers=cfg.enc_layers,
                                                          sparse=cfg.family == "sparse",
                                                          use_enc_aux_loss=cfg.use_enc_aux_loss, rho=cfg.rho),
                                      eff_specific_head=cfg.eff_specific_head, k_one2many=args.k_one2many,
                                      lambda_one2many=args.lambda_one2many)
        if args.nms != "greedy":
            raise ValueError(f"--nms {args.nms}: {args.model} has no NMS (the DETR family's post-processing is a "
                             "top-k)")
        self.post = None
        self.predict_fn = detr_predict
        self.loss_keys = ("loss", "loss_ce", "loss_bbox", "loss_giou")
        if cfg.num_queries_one2many and args.lambda_one2many:  # hybrid matching's last-layer terms, logged too
            self.loss_keys += ("loss_ce_one2many", "loss_bbox_one2many", "loss_giou_one2many")
        self.aux_dense_weight = None
        if cfg.aux_dense_head:
            self.aux_dense_weight = 2.0 * cfg.dec_layers if args.aux_dense_weight is None else args.aux_dense_weight
            self.loss_keys += ("loss_dense",)
        elif args.aux_dense_weight is not None:
            raise ValueError("--aux-dense-weight needs --aux-dense-head")
        self.detr_task_keys = self.loss_keys[1:]
        return model, s

    def _setup_distill(self, args, model) -> None:
        """ThumbDet: the frozen full-size teacher, the student started from its weights, the two phases.

        As in the official code (``main.py`` builds the teacher as the student itself and loads the full-size
        checkpoint into it), the student starts from the teacher's weights; its down-sampler starts at its
        initialisation.  Here the teacher is a separate copy, frozen: no gradients, eval mode.
        """
        self.teacher = None
        self.learns_thumbnail = False
        self.phase1_iters = 0
        self.adaptation = None
        if args.distill is None:
            return
        if args.teacher is None:
            raise ValueError(f"--distill {args.distill} needs --teacher CKPT: the trained model the student learns "
                             "from")
        if args.distill in ("ld", "frs"):
            self._setup_dense_distill(args, model)
            return
        if not 0.0 <= args.downsample_phase < 1.0:
            raise ValueError(f"--downsample-phase must be in [0, 1), got {args.downsample_phase}")
        teacher, classes, _ = load_trained_model(args.teacher, "cpu", model_name=None if self.is_detr else args.model)
        if list(classes) != list(self.classes):
            raise ValueError(f"{args.teacher}: the teacher's classes {list(classes)} are not the dataset's "
                             f"{list(self.classes)}")
        if find_thumbnailer(teacher) is not None:
            raise ValueError(f"{args.teacher}: the teacher sees a thumbnail itself; give the full-size model")
        theirs = teacher.state_dict()
        # Only the student's down-sampler is new.
        problems = state_dict_mismatch(model.state_dict(), theirs, may_miss=lambda key: "down_sample." in key)
        if problems:
            raise ValueError(f"{args.teacher}: not a full-size {args.model} for this student ({'; '.join(problems)})")
        model.load_state_dict(theirs, strict=False)
        teacher.requires_grad_(False)
        if args.channels_last and not self.is_detr:
            teacher = teacher.to(memory_format=torch.channels_last)
        self.teacher = teacher.to(self.device).eval()
        thumbnailer = find_thumbnailer(model)
        self.learns_thumbnail = thumbnailer is not None and thumbnailer.mode == "learned"
        if args.thumb_init == "antialias":
            if not self.learns_thumbnail:
                raise ValueError("--thumb-init antialias: only a learned thumbnail (--thumb-scale 2 or 4, "
                                 "--thumb-mode learned) has a down-sampler to initialise")
            thumbnailer.init_antialias()
        self.phase1_iters = round(args.downsample_phase * self.plan.total_iters)
        self.loss_keys = (*self.loss_keys, "loss_downsample", "loss_kd", "loss_fm")

    def _setup_dense_distill(self, args, model) -> None:
        """LD or FRS: the frozen teacher (any preset of the student's family with its levels, input size and
        preprocessing; the student keeps its own initialisation) and, for FRS, the adaptation layer."""
        from toolkit.distill.frs import FeatureAdaptation, FRSParams
        from toolkit.distill.ld import LDParams

        teacher, classes, teacher_name = load_trained_model(args.teacher, "cpu")
        if list(classes) != list(self.classes):
            raise ValueError(f"{args.teacher}: the teacher's classes {list(classes)} are not the dataset's "
                             f"{list(self.classes)}")
        if teacher_name not in INPUTS or find_thumbnailer(teacher) is not None:
            raise ValueError(f"{args.teacher}: a {teacher_name} teacher; --distill {args.distill} needs a full-size "
                             "model of the SSD family or a GFL head")
        if INPUTS[teacher_name] != INPUTS[args.model]:
            raise ValueError(f"{args.teacher}: the teacher ({teacher_name}) takes {INPUTS[teacher_name]}, the student "
                             f"({args.model}) {INPUTS[args.model]}: both must see the same batch")
        teacher_gfl = teacher_name in GFL_MODELS
        if args.distill == "ld" and not teacher_gfl:
            raise ValueError(f"{args.teacher}: --distill ld needs a teacher with a GFL head (gfl_* presets), not "
                             f"{teacher_name}")
        if args.distill == "frs" and teacher_gfl != self.is_gfl:
            raise ValueError(f"{args.teacher}: --distill frs pairs heads of one kind; the student {args.model} has "
                             f"{'a GFL' if self.is_gfl else 'an SSD'} head, the teacher {teacher_name} "
                             f"{'a GFL' if teacher_gfl else 'an SSD'} one")
        teacher.requires_grad_(False)
        if args.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        self.teacher = teacher.to(self.device).eval()
        self.teacher_name = teacher_name
        if args.distill == "ld":
            self.ld_params = LDParams(temperature=args.ld_temperature, weight=args.ld_weight,
                                      vlr_temperature=args.ld_temperature, vlr_weight=args.ld_vlr_weight,
                                      kd_weight=args.ld_kd_weight)
            self.loss_keys = (*self.loss_keys, "loss_ld", "loss_ld_vlr", "loss_kd")
            return
        if args.frs_warmup < 0:
            raise ValueError(f"--frs-warmup must be >= 0, got {args.frs_warmup}")
        self.frs_params = FRSParams.for_head("sigmoid" if self.is_gfl else "softmax", args.frs_feat_weight,
                                             args.frs_cls_weight, args.frs_warmup)
        # Created after the student, so that the student's initialisation is the undistilled run's.
        self.adaptation = FeatureAdaptation(model.backbone.out_channels, teacher.backbone.out_channels)
        self.loss_keys = (*self.loss_keys, "loss_frs_feat", "loss_frs_cls")

    # -- state
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            # ThumbDet's down-sampler under an SGD recipe (see __init__).
            "thumb_optimizer": None if self.thumb_optimizer is None else self.thumb_optimizer.state_dict(),
            "thumb_scheduler": None if self.thumb_optimizer is None else self.schedulers[1].state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "history": self.history,
            "evals": self.evals,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "model_name": self.args.model,
            "dataset": self.args.dataset,
            "classes": list(self.classes),
            "args": _jsonable_args(self.args),
            "model_config": self.model_config,
            # A ThumbDet student's thumbnail: toolkit.evaluate and toolkit.predict rebuild it.
            "thumbnail": ({"scale": self.args.thumb_scale, "mode": self.args.thumb_mode}
                          if self.args.distill == "thumbdet" else None),
            # FRS's adaptation layer: needed to resume, not to run the student.
            "frs_adaptation": None if self.adaptation is None else self.adaptation.state_dict(),
        }

    def _resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        if ckpt["model_name"] != self.args.model or list(ckpt["classes"]) != list(self.classes):
            raise ValueError(f"{path}: checkpoint is for model {ckpt['model_name']!r} with classes "
                             f"{ckpt['classes']}, not {self.args.model!r} / {list(self.classes)}")
        self.model.load_state_dict(ckpt["model"])
        if self.adaptation is not None:
            if ckpt.get("frs_adaptation") is None:
                raise ValueError(f"{path}: no FRS adaptation layer to resume --distill frs")
            self.adaptation.load_state_dict(ckpt["frs_adaptation"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.thumb_optimizer is not None:
            if ckpt.get("thumb_optimizer") is None:
                raise ValueError(f"{path}: no state of the down-sampler's optimizer to resume a learned thumbnail")
            self.thumb_optimizer.load_state_dict(ckpt["thumb_optimizer"])
            self.schedulers[1].load_state_dict(ckpt["thumb_scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.history = list(ckpt["history"])
        self.evals = list(ckpt["evals"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if self.dist.is_main:
            print(f"resumed from {path} at iteration {self.iteration}")

    def checkpoint(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.out / "checkpoint.pth", self.state())

    # -- loop
    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        s = self.plan.solver
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start_batch * s.batch_size)
        return DataLoader(self.train_set, batch_size=s.batch_size, sampler=self.sampler, drop_last=True,
                          num_workers=self.args.workers, collate_fn=self.collate,
                          persistent_workers=False, pin_memory=self.device.type == "cuda")

    def _forward(self, model, inputs) -> dict:
        """One forward pass of ``model`` (the student through DDP, or the teacher) on a batch, under autocast with
        --amp; every floating output in float32 (the losses' precision)."""
        autocast_dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=self.args.amp):
            if self.is_detr:
                images, mask = inputs
                out = model(images.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True))
            else:
                images = inputs.to(self.device, non_blocking=True)
                if self.args.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                out = model(images)
        return _float_tree(out)

    def _task_losses(self, out: dict, inputs, targets: list[dict], assigned=None) -> dict:
        """The detector's own loss: ``{"loss": weighted total, <components>}`` (``assigned``: a GFL head's ATSS
        assignment when LD has made it)."""
        if self.is_detr:
            from toolkit.models.detr.training import detr_targets

            losses = self.criterion(out, detr_targets(targets, self.device))
            total = self.criterion.total_loss(losses)
            if "aux_dense" in out:  # Co-DETR's dense branch: GFL's loss against the pixel boxes (weighted here)
                losses["loss_dense"] = self.aux_dense_weight * gfl_loss(out["aux_dense"], targets)["loss"]
                total = total + losses["loss_dense"]
            return {"loss": total, **{k: losses[k] for k in self.detr_task_keys}}
        if self.is_gfl:  # targets in pixels of the network input; the assignment moves them to the device
            return gfl_loss(out, targets, self.criterion.params, assigned)
        norm_targets = normalized_targets(targets, tuple(inputs.shape[-2:]), self.device)
        return self.criterion(out["loc"], out["conf"], out["priors"], out["variances"], norm_targets)

    def _distill_losses(self, out: dict, inputs, phase1: bool) -> dict:
        """ThumbDet's terms (unweighted): the down-sample loss (learned thumbnails), and after the first phase KD and
        FM against the frozen teacher on the full-size batch."""
        from toolkit.distill.thumbdet import downsample_loss, fm_loss, kd_loss, ssd_kd_loss

        zero = torch.zeros((), device=self.device)
        losses = {"loss_downsample": zero, "loss_kd": zero, "loss_fm": zero}
        if self.learns_thumbnail:
            losses["loss_downsample"] = downsample_loss(out["src_input"], out["downsample_input"])
        if phase1:
            return losses
        with torch.no_grad():
            teacher = self._forward(self.teacher, inputs)
        if self.is_detr:
            losses["loss_kd"] = kd_loss(out["pred_logits"], teacher["pred_logits"])
            losses["loss_fm"] = fm_loss(out["srcs"], teacher["srcs"])
        else:
            losses["loss_kd"] = ssd_kd_loss(out["conf"], teacher["conf"], [s.shape[-2:] for s in out["sources"]],
                                            [s.shape[-2:] for s in teacher["sources"]],
                                            self.model.prior_generator.num_priors_per_cell())
            losses["loss_fm"] = fm_loss(out["sources"], teacher["sources"])
        return losses

    def _dense_distill_losses(self, out: dict, inputs, targets: list[dict], assigned) -> dict:
        """LD's or FRS's terms, weighted, against the frozen teacher on the same batch."""
        with torch.no_grad():
            teacher = self._forward(self.teacher, inputs)
        if self.args.distill == "ld":
            from toolkit.distill.ld import ld_losses, vlr_regions

            vlr = vlr_regions(out, targets, self.ld_params) if self.ld_params.vlr_weight else \
                out["cls_logits"].new_zeros(out["cls_logits"].shape[:2])
            return ld_losses(out, teacher, assigned, vlr, self.ld_params)
        from toolkit.distill.frs import frs_losses, level_probabilities

        per_cell = None if self.is_gfl else self.model.prior_generator.num_priors_per_cell()
        student_probs = level_probabilities(out, per_cell)
        teacher_probs = level_probabilities(teacher, None if self.is_gfl
                                            else self.teacher.prior_generator.num_priors_per_cell())
        feat, cls = frs_losses(self.adaptation_ddp(out["sources"]), teacher["sources"], student_probs, teacher_probs)
        p = self.frs_params
        ramp = p.ramp(self.iteration)
        return {"loss_frs_feat": ramp * p.feat_weight * feat, "loss_frs_cls": ramp * p.cls_weight * cls}

    def _micro_step(self, inputs, targets: list[dict], scale: float) -> dict:
        """Forward, losses and backward of one micro-batch; returns every logged loss as a tensor."""
        phase1 = self.teacher is not None and self.learns_thumbnail and self.iteration < self.phase1_iters
        out = self._forward(self.ddp, inputs)
        zero = torch.zeros((), device=self.device)
        # LD and the GFL loss share one ATSS assignment.
        assigned = gfl_targets(out, targets, self.criterion.params) if self.args.distill == "ld" else None
        # ThumbDet's first phase: the down-sample loss alone (the official criterion before DOWN_SAMPLE_EPOCH).
        losses = dict.fromkeys(self.loss_keys, zero) if phase1 else self._task_losses(out, inputs, targets, assigned)
        total = zero if phase1 else losses["loss"]
        if self.args.distill in ("ld", "frs"):
            extra = self._dense_distill_losses(out, inputs, targets, assigned)
            losses.update(extra)
            total = total + sum(extra.values())
            losses["loss"] = total
        elif self.teacher is not None:
            extra = self._distill_losses(out, inputs, phase1)
            losses.update(extra)
            total = total + sum(getattr(self.args, k[len("loss_"):] + "_weight") * v for k, v in extra.items())
            losses["loss"] = total
        if not torch.isfinite(total):
            raise NonFiniteLossError(
                f"non-finite loss {total.item()} at iteration {self.iteration + 1} "
                f"({', '.join(f'{k} {losses[k].item():.4g}' for k in self.loss_keys[1:])}); "
                f"the last good checkpoint in {self.out} was kept")
        self.scaler.scale(total * scale).backward()
        return losses

    def train(self) -> None:
        from tqdm import tqdm

        s = self.plan.solver
        ipe = self.plan.iters_per_epoch
        bar = tqdm(total=self.plan.total_iters, initial=self.iteration, desc="train", dynamic_ncols=True,
                   disable=not self.dist.is_main or self.args.no_progress)
        start = time.time()
        while self.iteration < self.plan.total_iters:
            epoch, in_epoch = divmod(self.iteration, ipe)
            self._train_epoch(iter(self._loader(epoch, in_epoch * s.accum)), epoch, in_epoch, bar)
            if not self.args.ckpt_every:
                self.checkpoint()
        bar.close()
        self.train_seconds = time.time() - start

    def _train_epoch(self, loader, epoch: int, in_epoch: int, bar) -> None:
        """Steps of ``epoch`` from its batch ``in_epoch`` to its end or to the last iteration."""
        s = self.plan.solver
        for _ in range(in_epoch, self.plan.iters_per_epoch):
            if self.iteration >= self.plan.total_iters:
                break
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            sums = dict.fromkeys(self.loss_keys, 0.0)
            for _micro in range(s.accum):
                images, targets = next(loader)
                losses = self._micro_step(images, targets, 1.0 / s.accum)
                for k in sums:
                    sums[k] += losses[k].item() / s.accum
            if s.clip_max_norm > 0:
                for optimizer in self.optimizers:
                    self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.clip_max_norm)
            for optimizer in self.optimizers:  # SGD / AdamW skip parameters without a gradient (phase 1)
                self.scaler.step(optimizer)
            self.scaler.update()
            for scheduler in self.schedulers:
                scheduler.step()
            self.iteration += 1
            record = {"iteration": self.iteration, "lr": self.optimizer.param_groups[0]["lr"], **sums}
            self.history.append(record)
            if self.writer is not None:
                for k in sums:
                    self.writer.add_scalar(f"train/{k}", sums[k], self.iteration)
                self.writer.add_scalar("train/lr", record["lr"], self.iteration)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", lr=f"{record['lr']:.4g}", epoch=epoch)
            if self.args.ckpt_every and self.iteration % self.args.ckpt_every == 0:
                self.checkpoint()
            if self.args.eval_every and self.iteration % self.args.eval_every == 0 \
                    and self.iteration < self.plan.total_iters:
                self.evaluate()

    def evaluate(self):
        if self.test_set is None or not self.dist.is_main:
            return None
        loader = DataLoader(self.test_set, batch_size=16 if not self.is_detr else 4, shuffle=False,
                            num_workers=self.args.workers, collate_fn=self.collate)
        result, _ = evaluate_detector(self.model, self.test_set, loader, self.post, self.device,
                                      progress=not self.args.no_progress, predict_fn=self.predict_fn)
        self.evals.append({"iteration": self.iteration, "mAP": result.mAP, "ap": result.ap})
        if self.writer is not None:
            self.writer.add_scalar("eval/mAP", result.mAP, self.iteration)
        print(f"iteration {self.iteration}: mAP {100 * result.mAP:.2f}")
        return result

    def report(self, result, seconds: float) -> None:
        """Write report.md, loss.png, pr_curves.png, metrics.json and history.json."""
        if not self.dist.is_main:
            return
        write_json({"history": self.history, "evals": self.evals}, self.out / "history.json")
        plot_loss(self.history, self.evals, self.out / "loss.png", self.loss_keys)
        thumb_adam = "" if self.thumb_optimizer is None else f"; down-sampler on Adam, lr {self.args.downsample_lr}"
        lines = [f"# Training report: {self.args.model} on {self.args.dataset}", "",
                 f"- iterations: {self.iteration} ({self.plan.iters_per_epoch} per epoch), batch "
                 f"{self.plan.solver.batch_size} x accum {self.plan.solver.accum} x {self.dist.world} process(es)",
                 _solver_text(self.plan.solver),
                 *([self._distill_text(thumb_adam)] if self.teacher is not None else []),
                 f"- wall time: {seconds / 60:.1f} min",
                 f"- final loss: {self.history[-1]['loss']:.4f}" if self.history else "- no iterations", ""]
        metrics = {"model": self.args.model, "dataset": self.args.dataset, "iterations": self.iteration,
                   "train_seconds": round(seconds, 1)}
        if result is not None:
            metric = "coco" if hasattr(result, "stats") else "voc07"
            metrics.update({"metric": metric, "mAP": result.mAP, "ap": result.ap})
            plot_pr_curves(pr_curves(result), self.out / "pr_curves.png", f"{self.args.model} on "
                           f"{self.args.dataset}: {metric} mAP {100 * result.mAP:.2f}")
            lines += [f"## {metric} AP (test split)", "", "```", format_table(result.ap, result.mAP, "per class"),
                      "```",
                      "", "![loss](loss.png)", "", "![PR curves](pr_curves.png)", ""]
        else:
            lines += ["No test split with annotations: no evaluation.", "", "![loss](loss.png)", ""]
        write_json(metrics, self.out / "metrics.json")
        (self.out / "report.md").write_text("\n".join(lines))
        if self.writer is not None:
            self.writer.close()

    def _distill_text(self, thumb_adam: str) -> str:
        """The report's line on the distillation."""
        a = self.args
        if a.distill == "ld":
            p = self.ld_params
            return (f"- distillation: LD from {a.teacher} ({self.teacher_name}), temperature {p.temperature}; "
                    f"weights LD {p.weight}, LD-VLR {p.vlr_weight}, KD {p.kd_weight} "
                    f"(temperature {p.kd_temperature})")
        if a.distill == "frs":
            p = self.frs_params
            return (f"- distillation: FRS from {a.teacher} ({self.teacher_name}); weights feature {p.feat_weight}, "
                    f"classification {p.cls_weight}, ramped up over {p.warmup_iters} iterations")
        return (f"- distillation: ThumbDet from {a.teacher}, thumbnail {a.thumb_mode} {a.thumb_scale}x, down-sampler "
                f"alone for the first {self.phase1_iters} iterations"
                f"{'' if self.learns_thumbnail else ' (skipped: nothing to learn)'}{thumb_adam}"
                f"{'; down-sampler started as an anti-aliasing filter' if a.thumb_init == 'antialias' else ''}"
                f"; weights down-sample "
                f"{a.downsample_weight}, KD {a.kd_weight}, FM {a.fm_weight}")


def _solver_text(s: SolverPreset) -> str:
    if s.optimizer == "adamw":
        return (f"- solver: AdamW lr {s.base_lr} (backbone {s.lr_backbone}, sampling offsets and reference points "
                f"x{s.lr_linear_proj_mult}), weight decay {s.weight_decay}, gradient norm clipped at "
                f"{s.clip_max_norm}, lr x{s.gamma} at {list(s.steps)}")
    return (f"- solver: lr {s.base_lr:.4g}, steps {list(s.steps)}, momentum {s.momentum}, "
            f"weight decay {s.weight_decay}, warm-up {s.warmup_iters}")


def plot_loss(history: Sequence[dict], evals: Sequence[dict], path: Path,
              keys: Sequence[str] = ("loss", "loss_box", "loss_cls")) -> None:
    """Loss curves (``keys``: total and components; smoothed) and the eval mAPs on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if history:
        it = np.array([h["iteration"] for h in history])
        k = max(1, len(history) // 50)
        for key, style in zip(keys, ("-", "--", ":", "-.")):
            v = np.array([h[key] for h in history])
            smooth = np.convolve(v, np.ones(k) / k, mode="valid")
            ax.plot(it[k - 1:], smooth, style, label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (moving average)")
    ax.grid(alpha=0.3)
    if evals:
        ax2 = ax.twinx()
        ax2.plot([e["iteration"] for e in evals], [100 * e["mAP"] for e in evals], "o-", color="tab:red",
                 label="VOC07 mAP")
        ax2.set_ylabel("VOC07 mAP (%)")
        ax2.set_ylim(0, 100)
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    dist_info = init_distributed(args.device)
    try:
        trainer = Trainer(args, dist_info)
        trainer.train()
        result = trainer.evaluate()
        trainer.report(result, getattr(trainer, "train_seconds", 0.0))
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (DatasetError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist_info.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if dist_info.is_main and result is not None:
        print(format_table(result.ap, result.mAP, f"AP on the {args.dataset} test split"))
        print(f"report: {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
