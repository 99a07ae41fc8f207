"""Datasets: VOC, COCO and the embedded ``shapes`` default, by name.

Every dataset yields ``(image, target)`` with ``image`` a ``uint8 (H, W, 3)``
BGR array (before a transform) and ``target`` as documented in
:mod:`toolkit.data.voc`: ``boxes`` float32 ``(N, 4)`` xyxy continuous
pixels, ``labels`` int64 ``(N,)`` (1-based, 0 is background), ``difficult``
bool ``(N,)``, plus ``image_id`` and ``orig_size``.

Datasets live under the data root: ``$TOOLKIT_DATA`` or ``data/`` relative to
the working directory::

    data/VOCdevkit/VOC2007, data/VOCdevkit/VOC2012         (VOC)
    data/coco/{train2017,val2017}, data/coco/annotations    (COCO)
    data/shapes                                            (generated on first use)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from toolkit.data.errors import AnnotationError, DatasetError, DatasetNotFoundError, ImageReadError
from toolkit.data.voc import VOC_CLASSES, VOC_SPLITS, VOCDetection

__all__ = [
    "AnnotationError", "DatasetError", "DatasetNotFoundError", "ImageReadError",
    "VOC_CLASSES", "VOC_SPLITS", "VOCDetection", "DATASETS", "DatasetPreset",
    "build_dataset", "data_root",
]


@dataclass(frozen=True)
class DatasetPreset:
    """A dataset name of ``--dataset``: which split trains and which one evaluates.

    ``kind`` is ``"voc"`` (splits are keys of :data:`VOC_SPLITS`), ``"coco"``
    (splits are COCO folder names) or ``"shapes"``.  ``test`` is ``None`` where no
    split with public annotations exists.
    """

    kind: str
    train: str
    test: Optional[str]


DATASETS: dict[str, DatasetPreset] = {
    "voc0712": DatasetPreset("voc", "voc0712", "voc07test"),
    "voc0712plus": DatasetPreset("voc", "voc0712plus", None),
    "voc07": DatasetPreset("voc", "voc07trainval", "voc07test"),
    "voc12": DatasetPreset("voc", "voc12train", "voc12val"),
    "coco": DatasetPreset("coco", "train2017", "val2017"),
    "shapes": DatasetPreset("shapes", "train", "test"),
}
# Every named VOC split is also a dataset name (train and test are that split),
# except where a preset above already gives the name its train/test pair.
DATASETS.update({name: DatasetPreset("voc", name, name) for name in VOC_SPLITS if name not in DATASETS})


def data_root() -> Path:
    """``$TOOLKIT_DATA`` or ``./data``."""
    return Path(os.environ.get("TOOLKIT_DATA", "data"))


def build_dataset(
    name: str,
    split: str = "train",
    root: Optional[str | os.PathLike] = None,
    transform: Optional[Callable] = None,
    keep_difficult: bool = True,
    labelmap: Optional[str | os.PathLike] = None,
):
    """Build a dataset by preset name.

    Args:
        name: a key of :data:`DATASETS` (``voc0712``, ``voc07``, ``coco``, ``shapes``,
            or a named VOC split such as ``voc07test``).
        split: ``"train"`` or ``"test"``: which of the preset's splits.
        root: data root (default :func:`data_root`).
        labelmap: VOC only: a Caffe labelmap prototxt whose labels 1..K (display
            names) replace the 20 VOC class names.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    preset = DATASETS[name]
    which = preset.train if split == "train" else preset.test
    if which is None:
        raise ValueError(f"dataset {name!r} has no {split} split with public annotations")
    root = Path(root) if root is not None else data_root()
    if labelmap is not None and preset.kind != "voc":
        raise ValueError(f"labelmap applies to VOC datasets, not {name!r}")
    if preset.kind == "voc":
        classes = VOC_CLASSES
        if labelmap is not None:
            from toolkit.data.labelmap import read_labelmap

            classes = read_labelmap(labelmap).foreground
        return VOCDetection(root / "VOCdevkit", VOC_SPLITS[which], classes=classes, transform=transform,
                            keep_difficult=keep_difficult)
    if preset.kind == "coco":
        from toolkit.data.coco import COCODetection

        coco = root / "coco"
        return COCODetection(
            coco / which,
            coco / "annotations" / f"instances_{which}.json",
            transform=transform,
            remove_images_without_annotations=(split == "train"),
        )
    from toolkit.data.shapes import SHAPES_CLASSES, SUBDIR, read_manifest, shapes_dataset

    if read_manifest(root / "shapes") is not None:
        # A complete dataset is there (possibly generated with other sizes): use it as it is.
        return VOCDetection(root / "shapes" / "VOCdevkit", [(SUBDIR, which)], classes=SHAPES_CLASSES,
                            transform=transform, keep_difficult=keep_difficult)
    return shapes_dataset(root / "shapes", split=which, transform=transform, keep_difficult=keep_difficult)
