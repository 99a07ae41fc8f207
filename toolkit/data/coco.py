"""COCO detection through pycocotools.

Category ids ↔ contiguous labels: COCO's category ids (1..90 with gaps for
COCO 2017) are sorted and numbered ``1..K``; label 0 is the background.
``dataset.label_to_cat_id[label]`` and ``dataset.cat_id_to_label[cat_id]``
convert both ways.

Targets match the VOC ones (see :mod:`toolkit.data.voc`)::

    {"boxes": float32 (N, 4) xyxy continuous pixels  (COCO's [x, y, w, h] → [x, y, x + w, y + h]),
     "labels": int64 (N,), "difficult": bool (N,) (all False),
     "image_id": int (COCO image id), "orig_size": int64 (2,) (height, width)}

Crowd annotations (``iscrowd=1``) and boxes without area are left out of the
training target; COCO evaluation reads the annotation file itself, where
pycocotools treats crowd regions as "ignore" areas.  Images without
annotations are kept (they matter for evaluation) unless
``remove_images_without_annotations`` is set (useful for training).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from toolkit.data.errors import AnnotationError, DatasetNotFoundError
from toolkit.data.voc import read_image_bgr

# COCO 2017's category names by category id (0 and the ids COCO leaves unused are "N/A"): the classes of the
# 91-way heads that DETR-family models trained on COCO have (logit index = category id).
_COCO_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich",
    55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair",
    63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop",
    74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster",
    81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}
COCO_NAMES_BY_ID: tuple[str, ...] = tuple(_COCO_NAMES.get(i, "N/A") for i in range(91))


def load_coco(annotation_file: str | os.PathLike):
    """``pycocotools.coco.COCO`` for a file, quietly; clear errors for a missing or bad file."""
    from pycocotools.coco import COCO

    path = Path(annotation_file)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"COCO annotation file not found: {path}; expected <root>/annotations/instances_<split>.json "
            "and images under <root>/<split>/. See data/README.md for how to obtain and place COCO."
        )
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, KeyError, TypeError) as exc:
        raise AnnotationError(f"{path}: not a COCO annotation file ({type(exc).__name__}: {exc})") from None


class COCODetection(torch.utils.data.Dataset):
    """COCO detection dataset.

    Args:
        image_dir: folder holding the images named by ``file_name``.
        annotation_file: ``instances_*.json``.
        transform: optional ``transform(image_bgr, target) -> (image, target)``.
        remove_images_without_annotations: drop images with no usable (non-crowd) box.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        transform: Optional[Callable] = None,
        remove_images_without_annotations: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DatasetNotFoundError(
                f"COCO image folder not found: {self.image_dir}. See data/README.md for the COCO layout."
            )
        self.annotation_file = Path(annotation_file)
        self.coco = load_coco(annotation_file)
        cat_ids = sorted(self.coco.getCatIds())
        self.cat_id_to_label = {cat_id: i + 1 for i, cat_id in enumerate(cat_ids)}
        self.label_to_cat_id = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.classes: tuple[str, ...] = ("background", *(self.coco.cats[c]["name"] for c in cat_ids))
        ids = sorted(self.coco.getImgIds())
        if remove_images_without_annotations:
            ids = [i for i in ids if len(self._annotations(i)[0])]
        self.ids = ids
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def _annotations(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            if w <= 0 or h <= 0:
                continue
            cat = ann["category_id"]
            if cat not in self.cat_id_to_label:
                raise AnnotationError(
                    f"{self.annotation_file}: annotation {ann.get('id')} has unknown category_id {cat}"
                )
            boxes.append([x, y, x + w, y + h])
            labels.append(self.cat_id_to_label[cat])
        return np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels, dtype=np.int64)

    def get_annotation(self, index: int) -> dict:
        """The target of item ``index`` without decoding the image."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        return self._target(image_id, (info["height"], info["width"]))

    def _target(self, image_id: int, hw) -> dict:
        boxes, labels = self._annotations(image_id)
        return {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "difficult": torch.zeros(len(labels), dtype=torch.bool),
            "image_id": image_id,
            "orig_size": torch.tensor(hw, dtype=torch.int64),
        }

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def __getitem__(self, index: int):
        image = read_image_bgr(self.image_path(index))
        target = self._target(self.ids[index], image.shape[:2])
        if self.transform is not None:
            return self.transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"COCODetection({self.annotation_file}, {len(self)} images, {len(self.classes) - 1} classes)"
