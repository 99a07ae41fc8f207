"""Detections drawn on images: the pictures of ``toolkit.predict`` and ``python -m converters.caffe detect``."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np


def class_colours(num_classes: int) -> np.ndarray:
    """One BGR colour per label, ``uint8 (num_classes, 3)``, fixed for a given count (seeded), light enough
    that black caption text stays readable."""
    return np.random.default_rng(7).integers(60, 256, (max(num_classes, 1), 3)).astype(np.uint8)


def draw_detections(image_bgr: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    classes: Sequence[str]) -> np.ndarray:
    """Boxes drawn with ``class score`` captions on a copy of ``image_bgr``.

    Args:
        image_bgr: ``uint8 (H, W, 3)`` BGR.
        boxes: ``(K, 4)`` xyxy in continuous pixels of that image (a box may reach past the border:
            it is drawn clipped).
        scores: ``(K,)``.
        labels: ``(K,)`` integer labels, indices into ``classes``.
        classes: name per label.
    Returns:
        The drawn ``uint8 (H, W, 3)`` BGR image.
    """
    out = image_bgr.copy()
    colours = class_colours(len(classes))
    h, w = out.shape[:2]
    for box, score, label in zip(np.asarray(boxes, dtype=np.float64), scores, labels):
        x0, y0 = (int(round(min(max(v, 0.0), lim))) for v, lim in ((box[0], w - 1), (box[1], h - 1)))
        x1, y1 = (int(round(min(max(v, 0.0), lim))) for v, lim in ((box[2], w), (box[3], h)))
        colour = tuple(int(c) for c in colours[int(label) % len(colours)])
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, 2)
        name = classes[int(label)] if 0 <= int(label) < len(classes) else str(int(label))
        caption = f"{name} {float(score):.2f}"
        (tw, th), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        cv2.rectangle(out, (x0, max(0, y0 - th - 4)), (x0 + tw + 2, max(th + 4, y0)), colour, -1)
        cv2.putText(out, caption, (x0 + 1, max(th + 1, y0 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return out
