"""Datasets: VOC, COCO, SSD-Caffe LMDBs and the embedded ``shapes`` default, by name.

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

An SSD-Caffe LMDB is named by its path instead (relative to the working
directory, not the data root), see :func:`parse_lmdb_spec`::

    lmdb:PATH[,labelmap=FILE][,test=PATH2][,strict=1][,boxes=voc|continuous]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from toolkit.data.errors import (
    AnnotationError,
    CorruptRecordError,
    DatasetError,
    DatasetNotFoundError,
    ImageReadError,
)
from toolkit.data.voc import VOC_CLASSES, VOC_SPLITS

if TYPE_CHECKING:
    from toolkit.data.voc import VOCDetection

__all__ = [
    "AnnotationError", "CorruptRecordError", "DatasetError", "DatasetNotFoundError", "ImageReadError",
    "VOC_CLASSES", "VOC_SPLITS", "VOCDetection", "DATASETS", "DatasetPreset", "LMDB_PREFIX", "LMDBSpec",
    "build_dataset", "data_root", "parse_lmdb_spec",
]


@dataclass(frozen=True)
class DatasetPreset:
    """A dataset name of ``--dataset``: which split trains and which one evaluates.

    ``kind`` is ``"voc"`` (splits are keys of :data:`VOC_SPLITS`), ``"coco"``
    (splits are COCO folder names), ``"shapes"`` or ``"lmdb"`` (splits are LMDB
    paths).  ``test`` is ``None`` where no split with public annotations exists.
    """

    kind: str
    train: str
    test: Optional[str]


LMDB_PREFIX = "lmdb:"


@dataclass(frozen=True)
class LMDBSpec:
    """A parsed ``lmdb:`` dataset name (see :func:`parse_lmdb_spec`)."""

    path: str
    labelmap: Optional[str] = None
    test: Optional[str] = None
    strict: bool = False
    boxes: str = "voc"


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_lmdb_spec(name: str) -> LMDBSpec:
    """Parse ``lmdb:PATH[,labelmap=FILE][,test=PATH2][,strict=1][,boxes=voc|continuous]``.

    ``PATH`` is the training LMDB (the ``train`` split); ``test=PATH2`` gives the
    ``test`` split (none without it); ``labelmap`` names the classes (default: the
    20 VOC classes); ``strict`` fails on a corrupt record instead of skipping it;
    ``boxes`` is the box convention of :mod:`toolkit.data.caffe_lmdb`.  Paths may
    not contain commas.

    Raises:
        ValueError: not an ``lmdb:`` name, an empty path, or an unknown / malformed option.
    """
    if not name.startswith(LMDB_PREFIX):
        raise ValueError(f"not an LMDB dataset name (expected {LMDB_PREFIX}PATH[,key=value...]): {name!r}")
    path, *options = name[len(LMDB_PREFIX):].split(",")
    if not path:
        raise ValueError(f"{name!r}: no LMDB path after {LMDB_PREFIX!r}")
    fields: dict = {"path": path}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not value or key not in ("labelmap", "test", "strict", "boxes"):
            raise ValueError(
                f"{name!r}: bad option {option!r}; options are labelmap=FILE, test=PATH, strict=0|1, "
                "boxes=voc|continuous"
            )
        if key == "strict":
            if value.lower() not in _TRUE + _FALSE:
                raise ValueError(f"{name!r}: strict must be 0 or 1, got {value!r}")
            fields[key] = value.lower() in _TRUE
        elif key == "boxes":
            if value not in ("voc", "continuous"):
                raise ValueError(f"{name!r}: boxes must be 'voc' or 'continuous', got {value!r}")
            fields[key] = value
        else:
            fields[key] = value
    return LMDBSpec(**fields)


class _DatasetTable(dict):
    """The named presets; looking up an ``lmdb:`` name gives its preset without storing it.

    So ``DATASETS[name].test`` works for LMDB names too, while ``in`` and
    iteration see the named presets only.
    """

    def __missing__(self, name):
        if isinstance(name, str) and name.startswith(LMDB_PREFIX):
            spec = parse_lmdb_spec(name)
            return DatasetPreset("lmdb", spec.path, spec.test)
        raise KeyError(name)


DATASETS: dict[str, DatasetPreset] = _DatasetTable({
    "voc0712": DatasetPreset("voc", "voc0712", "voc07test"),
    "voc0712plus": DatasetPreset("voc", "voc0712plus", None),
    "voc07": DatasetPreset("voc", "voc07trainval", "voc07test"),
    "voc12": DatasetPreset("voc", "voc12train", "voc12val"),
    "coco": DatasetPreset("coco", "train2017", "val2017"),
    "shapes": DatasetPreset("shapes", "train", "test"),
})
# Every named VOC split is also a dataset name (train and test are that split),
# except where a preset above already gives the name its train/test pair.
DATASETS.update({name: DatasetPreset("voc", name, name) for name in VOC_SPLITS if name not in DATASETS})


def __getattr__(name: str):
    # VOCDetection imports torch when first used (see toolkit.data.voc); importing this package does not.
    if name == "VOCDetection":
        from toolkit.data.voc import VOCDetection

        return VOCDetection
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
            or a named VOC split such as ``voc07test``), or an LMDB spec
            ``lmdb:PATH[,labelmap=FILE][,test=PATH2]...`` (:func:`parse_lmdb_spec`).
        split: ``"train"`` or ``"test"``: which of the preset's splits.
        root: data root (default :func:`data_root`); LMDB paths do not use it.
        labelmap: VOC and LMDB only: a Caffe labelmap prototxt whose labels 1..K
            (display names) replace the 20 VOC class names.
    """
    if isinstance(name, str) and name.startswith(LMDB_PREFIX):
        return _build_lmdb(name, split, transform, keep_difficult, labelmap)
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
    from toolkit.data.voc import VOCDetection

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


def _build_lmdb(name: str, split: str, transform, keep_difficult: bool, labelmap):
    from toolkit.data.caffe_lmdb import LMDBDetection

    spec = parse_lmdb_spec(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = spec.path if split == "train" else spec.test
    if path is None:
        raise ValueError(f"dataset {name!r} has no test split: add ',test=PATH' to name a test LMDB")
    if labelmap is not None and spec.labelmap is not None and Path(labelmap) != Path(spec.labelmap):
        raise ValueError(f"dataset {name!r} names labelmap {spec.labelmap!r}, and labelmap={str(labelmap)!r} was given")
    return LMDBDetection(path, labelmap=spec.labelmap or labelmap, transform=transform,
                         keep_difficult=keep_difficult, strict=spec.strict, box_convention=spec.boxes)
