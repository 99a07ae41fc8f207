"""Training and evaluation loops shared by ``toolkit.train`` and ``toolkit.evaluate``.

Exact resumption: every sample's augmentation draws from its own generator,
``np.random.default_rng([seed, epoch, index])`` (:class:`AugmentedDataset`), and
the order of an epoch is a permutation seeded by ``seed + epoch``
(:class:`EpochSampler`), so a run resumed at any iteration sees the same batches
whatever the number of DataLoader workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from toolkit.evaluation.submission import detections_from_predictions, ground_truth_from_voc
from toolkit.evaluation.voc import evaluate_voc
from toolkit.models.postprocess import DetectionOutputParams, detection_output


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse instead of unmapping it.

    A CPU training step allocates and frees tens of megabytes of activations; with
    glibc's defaults much of that goes back to the kernel and every step faults it
    in again as zeroed pages (a third of the time in the kernel for ``dsod_tiny``).
    Serving blocks up to 32 MiB from the heap and never trimming it made the steps
    1.23x faster (``bench/bench_allocator.py``).  The process keeps its peak memory.
    Returns ``False`` where the C library is not glibc (nothing is changed).
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) == 1
        return libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and ok
    except (OSError, AttributeError):
        return False


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the iteration."""


# ----------------------------------------------------------------------------- data
class InMemoryDataset(Dataset):
    """Every ``(image, target)`` of ``dataset`` read and decoded once, then served from memory.

    For small datasets on few cores (the ``shapes`` main job: 8,000 images warped to
    float32 160x160 tensors, 2.3 GiB), where decoding would otherwise compete with training for
    the CPU.  Build it before the DataLoader starts workers: forked workers share
    the decoded arrays.  ``classes`` is taken over from ``dataset``.
    """

    def __init__(self, dataset: Dataset, progress: bool = True) -> None:
        from tqdm import tqdm

        self.classes = getattr(dataset, "classes", None)
        self.items = [dataset[i] for i in tqdm(range(len(dataset)), desc="cache images", disable=not progress,
                                               leave=False)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image, target = self.items[index]
        # Copies: a transform that edits its input in place must not change the cache.
        image = image.clone() if isinstance(image, torch.Tensor) else image.copy()
        return image, {k: (v.clone() if isinstance(v, torch.Tensor) else v.copy() if isinstance(v, np.ndarray)
                                  else v) for k, v in target.items()}


class AugmentedDataset(Dataset):
    """Wraps a dataset without transform; applies ``transform`` with a per-sample generator.

    ``transform(image, target, rng)`` must accept the generator (the SSD transforms do,
    through :meth:`~toolkit.data.transforms.SSDTrainTransform.augment`).  Call
    :meth:`set_epoch` before each epoch (before the DataLoader iterator is created).
    """

    def __init__(self, dataset: Dataset, transform: Callable, seed: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        return self.transform(image, target, rng)


class EpochSampler(Sampler[int]):
    """Shuffled (or sequential) indices of one epoch, sharded across ranks by batches, resumable.

    The order of epoch ``e`` is a permutation from a generator seeded with
    ``seed + e``, cut into batches of ``batch_size``; rank ``r`` of ``world`` takes
    batches ``r, r + world, r + 2 * world, ...`` (only whole rounds of ``world``
    batches are used).  Step ``i`` of ``world`` processes therefore sees exactly
    the micro-batches that step ``i`` of one process with ``accum = world`` sees.
    ``start`` skips the first indices of this rank (a resumed epoch).
    """

    def __init__(self, length: int, batch_size: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        self.length = length
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.start = 0
        self.rounds = length // (batch_size * world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        b, w = self.batch_size, self.world
        out = []
        for k in range(self.rounds):
            first = (k * w + self.rank) * b
            out.extend(order[first:first + b])
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.rounds * self.batch_size - self.start


# ---------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


# ------------------------------------------------------------------------ targets
def normalized_targets(targets: Sequence[dict], image_hw: tuple[int, int], device: torch.device) -> list[dict]:
    """Pixel targets of the network input → normalized boxes for the loss."""
    h, w = image_hw
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    out = []
    for t in targets:
        out.append({
            "boxes": (t["boxes"] / scale).to(device),
            "labels": t["labels"].to(device),
            "difficult": t["difficult"].to(device),
        })
    return out


# ----------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, params: DetectionOutputParams) -> list[dict]:
    """Run the detector and post-process; boxes stay normalized xyxy."""
    out = model(images)
    probs = F.softmax(out["conf"].float(), dim=-1)
    return detection_output(out["loc"].float().cpu(), probs.cpu(), out["priors"].cpu(), out["variances"].cpu(), params)


def predict_batch(model: torch.nn.Module, inputs, device: torch.device, predict_fn: Optional[Callable] = None,
                  params: Optional[DetectionOutputParams] = None) -> list[dict]:
    """One batch's detections (boxes normalized xyxy): ``predict_fn(model, inputs, device)`` for families with
    their own post-processing (DETR: ``inputs = (images, mask)``), else the SSD post-processing with ``params``."""
    if predict_fn is not None:
        return predict_fn(model, inputs, device)
    return predict(model, inputs.to(device), params)


def to_image_pixels(detections: dict, orig_hw: Sequence[int]) -> dict:
    """Normalized boxes → continuous pixels of the original image (clipped to it)."""
    h, w = int(orig_hw[0]), int(orig_hw[1])
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    boxes = detections["boxes"] * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return {**detections, "boxes": boxes}


def evaluate_detector(
    model: torch.nn.Module,
    dataset,
    loader,
    params: DetectionOutputParams,
    device: torch.device,
    metric: str = "voc07",
    progress: bool = False,
    predict_fn: Optional[Callable] = None,
):
    """AP of ``model`` on a dataset: VOC AP (``metric``) for VOC-style datasets, COCO AP
    (pycocotools) for :class:`~toolkit.data.coco.COCODetection`.

    ``loader`` yields ``(images, targets)`` with the test transform applied (targets
    carry ``image_id`` and ``orig_size``); ``dataset`` provides the ground truth.
    Returns ``(result, predictions)``: a :class:`~toolkit.evaluation.voc.VOCEvalResult` or
    :class:`~toolkit.evaluation.coco.COCOEvalResult` (both have ``mAP`` and ``ap``),
    and the per-image predictions in pixels of the original images.  ``predict_fn(model, inputs, device)``
    replaces the SSD post-processing (``params`` unused then): the DETR family's batches are ``(images, mask)``
    and its predictions come from its own post-processing; boxes are normalized xyxy either way.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    predictions = []
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        dets = predict_batch(model, images, device, predict_fn, params)
        for d, t in zip(dets, targets):
            p = to_image_pixels(d, t["orig_size"].tolist())
            p["image_id"] = t["image_id"]
            predictions.append(p)
    model.train(was_training)
    return evaluate_predictions(dataset, predictions, metric), predictions


def evaluate_predictions(dataset, predictions: Sequence[dict], metric: str = "voc07"):
    """AP of per-image predictions against ``dataset``'s ground truth: VOC AP (``metric``) for
    VOC-style datasets (VOC, shapes, LMDB), COCO AP (pycocotools) for
    :class:`~toolkit.data.coco.COCODetection`.

    Args:
        dataset: the dataset the predictions were made on (its ``classes`` have the
            background first).
        predictions: one dict per image: ``image_id``, ``boxes`` float ``(K, 4)`` xyxy in
            continuous pixels of the original image, ``scores`` ``(K,)``, ``labels``
            int64 ``(K,)`` in ``1..len(dataset.classes) - 1``.
    Returns:
        A :class:`~toolkit.evaluation.voc.VOCEvalResult` or
        :class:`~toolkit.evaluation.coco.COCOEvalResult` (both have ``mAP`` and ``ap``).
    """
    if hasattr(dataset, "coco"):
        from toolkit.evaluation.coco import evaluate_coco, predictions_to_coco

        return evaluate_coco(dataset.coco, predictions_to_coco(predictions, dataset.label_to_cat_id))
    classes = dataset.classes[1:]
    return evaluate_voc(ground_truth_from_voc(dataset), detections_from_predictions(predictions, classes),
                        classes, metric)


def pr_curves(result) -> dict:
    """class → ``(recall, precision, ap)`` of a VOC or COCO result, for plotting."""
    if hasattr(result, "pr_curves"):
        return dict(result.pr_curves)
    return {n: (r.recall, r.precision, r.ap) for n, r in result.per_class.items() if n in result.ap}


# ---------------------------------------------------------------------- checkpoints
CAFFE_DETECT_HINT = ("run it as a Caffe net instead: python -m converters.caffe detect {path} IMAGE... --out DIR, "
                     "or python -m converters.caffe evaluate {path} --dataset NAME")


def load_trained_model(path, device: torch.device | str = "cpu", model_name: Optional[str] = None,
                       classes: Optional[Sequence[str]] = None):
    """A detector from a ``toolkit.train`` checkpoint, or from a Caffe model converted by
    ``python -m converters.caffe convert`` (both loaded with ``weights_only=True``).

    A converted checkpoint holds Caffe's blobs, not the toolkit's model name: its
    layers load through a native model's rename table
    (:func:`toolkit.models.caffe_import.load_caffe_blobs`), ``model_name`` or else the
    preset whose rename table names exactly its layers (``dsod300``, ``ssd300``,
    ``grp_dsod320``).  Its class names are ``classes`` (``"background"`` first), else
    the ``"classes"`` that ``convert --labelmap`` stored.  A converted net that maps
    onto no preset is refused with the ``converters.caffe`` command that runs it.

    Returns:
        ``(model in eval mode, classes (with "background" first), model name)``.
    Raises:
        FileNotFoundError: no such file.
        ValueError: not a checkpoint of either kind, a converted checkpoint that maps
            onto no preset or has no class names, or blobs that do not fit (each layer named).
    """
    ckpt, model_name = read_checkpoint(path, model_name)
    return model_from_checkpoint(ckpt, path, model_name, classes, device)


def model_from_checkpoint(ckpt: dict, path, model_name: str, classes: Optional[Sequence[str]] = None,
                          device: torch.device | str = "cpu"):
    """:func:`load_trained_model` on a checkpoint already read by :func:`read_checkpoint`
    (``path`` names it in messages)."""
    from toolkit.models.build import build_model

    if is_detr_checkpoint(ckpt):
        from toolkit.models.detr import DeformableDETRConfig, build_deformable_detr

        cfg = DeformableDETRConfig(**(ckpt.get("model_config") or ckpt["config"]))
        model = build_deformable_detr(cfg, train_backbone=False)
        model.load_state_dict(ckpt["model"])
        if classes is None:
            classes = ckpt.get("classes") or detr_default_classes(cfg.num_classes)
        classes = tuple(classes)
        if len(classes) != cfg.num_classes + 1:
            raise ValueError(f"{path}: {len(classes) - 1} class names for a model with {cfg.num_classes} classes")
        return model.to(device).eval(), classes, model_name
    if is_converted_checkpoint(ckpt):
        from toolkit.models.caffe_import import CaffeWeightsError, converted_blobs, load_caffe_blobs

        classes = classes if classes is not None else ckpt.get("classes")
        if classes is None:
            raise ValueError(f"{path}: a converted Caffe checkpoint without class names; give them (a labelmap), "
                             "or convert with --labelmap")
        classes = tuple(classes)
        model = build_model(model_name, len(classes))
        try:
            load_caffe_blobs(model, model.caffe_names, converted_blobs(ckpt, str(path)))
        except CaffeWeightsError as exc:
            raise CaffeWeightsError(f"{path}: does not load into {model_name}: {exc}; "
                                    + CAFFE_DETECT_HINT.format(path=path)) from None
        return model.to(device).eval(), classes, model_name
    classes = tuple(ckpt["classes"])
    model = build_model(model_name, len(classes))
    thumbnail = ckpt.get("thumbnail")
    if thumbnail and thumbnail.get("scale", 1) > 1:  # a ThumbDet student of the SSD family (toolkit.train --distill)
        add_ssd_thumbnail(model, model_name, thumbnail["scale"], thumbnail["mode"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), classes, model_name


def add_ssd_thumbnail(model, model_name: str, scale: int, mode: str):
    """:func:`toolkit.models.build.add_thumbnail` with the preset's own Caffe preprocessing (``INPUTS``)."""
    from toolkit.data.transforms import PREPROCESS_PRESETS
    from toolkit.models.build import INPUTS, add_thumbnail

    pre = PREPROCESS_PRESETS[INPUTS[model_name].preprocess]
    return add_thumbnail(model, scale, mode, pre.mean_bgr, pre.scale, pre.channel_order)


DETR_CHECKPOINT_FORMAT = "legacy-det/detr/1"  # what python -m converters.detr convert writes


def is_detr_checkpoint(checkpoint) -> bool:
    """A DETR-family checkpoint: ``toolkit.train``'s (with ``model_config``) or ``converters.detr convert``'s."""
    return isinstance(checkpoint, dict) and (checkpoint.get("format") == DETR_CHECKPOINT_FORMAT
                                             or bool(checkpoint.get("model_config")))


def detr_default_classes(num_classes: int) -> tuple[str, ...]:
    """Class names (background first) of a DETR head without stored names: COCO's by category id for the
    official 91-way head, else ``class_<i>``."""
    from toolkit.data.coco import COCO_NAMES_BY_ID

    if num_classes == len(COCO_NAMES_BY_ID):
        return ("background", *COCO_NAMES_BY_ID)
    return ("background", *(f"class_{i}" for i in range(num_classes)))


@dataclass(frozen=True)
class InferenceSetup:
    """How a model family reads images: the test transform, the batch collation and the prediction function
    (``predict_fn(model, inputs, device)``; None: the SSD post-processing with ``params``)."""

    transform: Callable
    collate: Callable
    predict_fn: Optional[Callable]
    params: Optional[DetectionOutputParams]
    batch_size: int


def inference_setup(model_name: str, num_classes: int, nms: str = "greedy") -> InferenceSetup:
    """The test-time pipeline of a preset (``num_classes`` with the background).  ``nms``: the SSD family's NMS
    (:data:`toolkit.models.postprocess.NMS_KINDS`; the GFL-head presets apply it at GFL's IoU 0.6); the DETR family
    has none (its post-processing is a top-k).

    Raises:
        ValueError: an unknown ``nms``, or another NMS than ``"greedy"`` for the DETR family.
    """
    from toolkit.models.detr.training import DETR_PRESETS
    from toolkit.models.postprocess import NMS_KINDS

    if nms not in NMS_KINDS:
        raise ValueError(f"unknown NMS {nms!r}; choose from {NMS_KINDS}")
    if model_name in DETR_PRESETS:
        if nms != "greedy":
            raise ValueError(f"--nms {nms}: {model_name} has no NMS (the DETR family's post-processing is a top-k)")
        from toolkit.data.detr_transforms import DETRTestTransform, collate_padded
        from toolkit.models.detr.training import detr_predict

        preset = DETR_PRESETS[model_name]
        return InferenceSetup(DETRTestTransform(preset.test_scale, preset.max_size), collate_padded, detr_predict,
                              None, 4)
    from toolkit.data.transforms import PREPROCESS_PRESETS, SSDTestTransform, collate_detection
    from toolkit.models.build import GFL_MODELS, INPUTS, default_postprocess

    spec = INPUTS[model_name]
    transform = SSDTestTransform(spec.size, PREPROCESS_PRESETS[spec.preprocess])
    if model_name in GFL_MODELS:  # the SSD family's input, GFL's post-processing (toolkit.models.gfl)
        from toolkit.models.gfl import GFLPostprocessParams, predict_gfl

        return InferenceSetup(transform, collate_detection, partial(predict_gfl, params=GFLPostprocessParams(nms=nms)),
                              None, 16)
    return InferenceSetup(transform, collate_detection, None, replace(default_postprocess(num_classes), nms=nms), 16)


def relabel(predict_fn: Optional[Callable], params, mapping: dict[int, int]) -> Callable:
    """A ``predict_fn`` whose labels go through ``mapping`` (model label -> dataset label); others dropped."""
    def run(model, inputs, device):
        dets = predict_batch(model, inputs, device, predict_fn, params)
        out = []
        for d in dets:
            labels = torch.tensor([mapping.get(int(v), -1) for v in d["labels"]], dtype=torch.int64)
            keep = labels >= 0
            out.append({**d, "boxes": d["boxes"][keep], "scores": d["scores"][keep], "labels": labels[keep]})
        return out

    return run


def is_converted_checkpoint(checkpoint) -> bool:
    """Whether a loaded checkpoint is one that ``python -m converters.caffe convert`` wrote."""
    from toolkit.models.caffe_import import CONVERTED_BLOBS_KEY

    return isinstance(checkpoint, dict) and CONVERTED_BLOBS_KEY in checkpoint


def read_checkpoint(path, model_name: Optional[str] = None) -> tuple[dict, str]:
    """A ``toolkit.train`` or converted checkpoint (``weights_only=True``) and the model preset it is for.

    For a ``toolkit.train`` checkpoint the preset is the one it records; for a converted one
    ``model_name`` if given, else the preset whose rename table names exactly its Caffe
    layers with weights (:func:`toolkit.models.build.presets_for_caffe_layers`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a checkpoint of either kind, an unknown ``model_name``, or a
            converted net that maps onto no preset (the message says which
            ``converters.caffe`` command runs it).
    """
    ckpt = load_checkpoint_file(path)
    return ckpt, checkpoint_model_name(ckpt, path, model_name)


def load_checkpoint_file(path):
    """``torch.load(path, weights_only=True)`` on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable PyTorch checkpoint.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors of a file that is not a torch checkpoint
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None


def checkpoint_model_name(ckpt, path, model_name: Optional[str] = None) -> str:
    """:func:`read_checkpoint`'s preset of a checkpoint already loaded from ``path`` (named in messages)."""
    from toolkit.models.build import MODELS, presets_for_caffe_layers
    from toolkit.models.caffe_import import CONVERTED_BLOBS_KEY

    if is_detr_checkpoint(ckpt):
        for key in ("model", "model_name"):
            if key not in ckpt:
                raise ValueError(f"{path}: a DETR checkpoint without {key!r}")
        return ckpt["model_name"]
    if model_name is not None and model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose from {sorted(MODELS)}")
    if is_converted_checkpoint(ckpt):
        if model_name is None:
            layers = [name for name, blobs in ckpt[CONVERTED_BLOBS_KEY].items() if len(blobs)]
            presets = presets_for_caffe_layers(layers)
            if not presets:
                raise ValueError(f"{path}: a converted Caffe net whose layers map onto none of the native models "
                                 f"({', '.join(sorted(MODELS))}); " + CAFFE_DETECT_HINT.format(path=path))
            model_name = presets[0]
        return model_name
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a toolkit.train checkpoint")
    for key in ("model", "model_name", "classes"):
        if key not in ckpt:
            raise ValueError(f"{path}: not a toolkit.train checkpoint (no {key!r})")
    return ckpt["model_name"]
