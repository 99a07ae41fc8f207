"""PASCAL VOC: XML annotations, ImageSets splits and the detection dataset.

Coordinate convention (the one place where it is defined)
---------------------------------------------------------
VOC XML stores ``xmin ymin xmax ymax`` as **1-based, inclusive** pixel indices:
a box that covers the first column of an image has ``xmin = 1`` and a box that
covers the whole width ``W`` has ``xmax = W``.  Everywhere inside the toolkit,
boxes are **continuous absolute pixel coordinates** ``xyxy`` in which pixel
``i`` (0-based) spans ``[i, i + 1)``.  Therefore::

    x0 = xmin - 1,   y0 = ymin - 1,   x1 = xmax,   y1 = ymax        (voc_to_xyxy)
    xmin = x0 + 1,   ymin = y0 + 1,   xmax = x1,   ymax = y1        (xyxy_to_voc)

With this mapping VOC's "+1" area ``(xmax - xmin + 1) * (ymax - ymin + 1)``
equals the continuous area ``(x1 - x0) * (y1 - y0)``, so IoUs computed either
way agree.  The evaluator (:mod:`toolkit.evaluation.voc`) works in VOC's own
convention on submission files and converts in-memory boxes with
:func:`xyxy_to_voc`.

Targets
-------
``VOCDetection[i]`` returns ``(image, target)`` where ``image`` is the decoded
``uint8`` array ``(H, W, 3)`` in **BGR** order (what Caffe's OpenCV decoder
produced) and ``target`` is::

    {"boxes":      float32 tensor (N, 4), xyxy continuous pixels (see above),
     "labels":     int64 tensor (N,), 1..num_classes (0 is background),
     "difficult":  bool tensor (N,),
     "image_id":   str, the VOC image id ("2007_000027"),
     "orig_size":  int64 tensor (2,), (height, width) of the decoded image}

followed by ``transform(image, target)`` when a transform is given.
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

from toolkit.data.errors import AnnotationError, DatasetNotFoundError, ImageReadError

if TYPE_CHECKING:
    import torch.utils.data

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
"""The 20 VOC class names in the devkit's (alphabetical) order; label = index + 1."""

# Named splits: each is a list of (VOCdevkit sub-folder, ImageSets/Main list name).
VOC_SPLITS: dict[str, tuple[tuple[str, str], ...]] = {
    "voc07trainval": (("VOC2007", "trainval"),),
    "voc07test": (("VOC2007", "test"),),
    "voc12train": (("VOC2012", "train"),),
    "voc12trainval": (("VOC2012", "trainval"),),
    "voc12val": (("VOC2012", "val"),),
    # SSD's and DSOD's "07+12": VOC2007 trainval + VOC2012 trainval.
    "voc0712": (("VOC2007", "trainval"), ("VOC2012", "trainval")),
    # DSOD's "07++12": VOC2007 trainval + test + VOC2012 trainval.
    "voc0712plus": (("VOC2007", "trainval"), ("VOC2007", "test"), ("VOC2012", "trainval")),
}

_LAYOUT_HELP = (
    "expected layout: <root>/{sub}/JPEGImages/<id>.jpg, <root>/{sub}/Annotations/<id>.xml "
    "and <root>/{sub}/ImageSets/Main/<split>.txt. See data/README.md for how to obtain and "
    "place VOC."
)


def voc_to_xyxy(boxes_voc: np.ndarray) -> np.ndarray:
    """VOC 1-based inclusive ``(xmin, ymin, xmax, ymax)`` → continuous xyxy pixels.

    Args:
        boxes_voc: ``(N, 4)`` array-like.
    Returns:
        ``(N, 4)`` float32 array ``(xmin - 1, ymin - 1, xmax, ymax)``.
    """
    b = np.asarray(boxes_voc, dtype=np.float64).reshape(-1, 4)
    out = b.copy()
    out[:, :2] -= 1.0
    return out.astype(np.float32)


def xyxy_to_voc(boxes_xyxy: np.ndarray) -> np.ndarray:
    """Continuous xyxy pixels → VOC 1-based inclusive ``(x0 + 1, y0 + 1, x1, y1)``.

    Args:
        boxes_xyxy: ``(N, 4)`` array-like (numpy or torch).
    Returns:
        ``(N, 4)`` float64 array.
    """
    torch = sys.modules.get("torch")  # a tensor implies torch is imported; this module does not import it
    if torch is not None and isinstance(boxes_xyxy, torch.Tensor):
        boxes_xyxy = boxes_xyxy.detach().cpu().numpy()
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4).copy()
    b[:, :2] += 1.0
    return b


@dataclass
class VOCObject:
    """One ``<object>`` of a VOC XML; ``bbox_voc`` is 1-based inclusive (as in the file)."""

    name: str
    bbox_voc: tuple[float, float, float, float]
    difficult: bool
    truncated: bool


@dataclass
class VOCAnnotation:
    """A parsed VOC XML file."""

    path: Path
    filename: str
    width: int
    height: int
    depth: int
    objects: list[VOCObject]


def _child_text(elem: ET.Element, tag: str, path: Path, required: bool = True) -> Optional[str]:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise AnnotationError(f"{path}: <{elem.tag}> has no <{tag}> value")
        return None
    return child.text.strip()


def _parse_number(text: str, tag: str, path: Path) -> float:
    try:
        return float(text)
    except ValueError:
        raise AnnotationError(f"{path}: <{tag}> is not a number: {text!r}") from None


def read_xml_root(path: str | os.PathLike) -> ET.Element:
    """The root element of an annotation XML file.

    Raises:
        AnnotationError: naming the file, when it cannot be read or is malformed XML.
    """
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AnnotationError(f"{path}: malformed XML ({exc})") from None
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot read annotation ({exc.strerror or exc})") from None


def parse_voc_xml(path: str | os.PathLike) -> VOCAnnotation:
    """Parse one VOC annotation file.

    Only each object's direct ``<bndbox>`` is read (the ``<part>`` boxes of the
    person-layout annotations are ignored).  Coordinates may be integers or
    decimals (some VOC2012 files have decimals); they are kept as floats.

    Raises:
        AnnotationError: naming the file, on malformed XML, a missing field or a
            non-numeric coordinate.
    """
    path = Path(path)
    root = read_xml_root(path)
    filename = _child_text(root, "filename", path, required=False) or (path.stem + ".jpg")
    size = root.find("size")
    width = height = depth = 0
    if size is not None:
        width = int(_parse_number(_child_text(size, "width", path), "width", path))
        height = int(_parse_number(_child_text(size, "height", path), "height", path))
        depth_text = _child_text(size, "depth", path, required=False)
        depth = int(_parse_number(depth_text, "depth", path)) if depth_text else 3
    objects = []
    for obj in root.findall("object"):
        name = _child_text(obj, "name", path)
        bnd = obj.find("bndbox")
        if bnd is None:
            raise AnnotationError(f"{path}: object {name!r} has no <bndbox>")
        coords = tuple(
            _parse_number(_child_text(bnd, tag, path), tag, path)
            for tag in ("xmin", "ymin", "xmax", "ymax")
        )
        if coords[2] < coords[0] or coords[3] < coords[1]:
            raise AnnotationError(f"{path}: object {name!r} has an inverted box {coords}")
        difficult_text = _child_text(obj, "difficult", path, required=False)
        truncated_text = _child_text(obj, "truncated", path, required=False)
        objects.append(
            VOCObject(
                name=name,
                bbox_voc=coords,  # type: ignore[arg-type]
                difficult=bool(int(_parse_number(difficult_text, "difficult", path))) if difficult_text else False,
                truncated=bool(int(_parse_number(truncated_text, "truncated", path))) if truncated_text else False,
            )
        )
    return VOCAnnotation(path, filename, width, height, depth, objects)


def read_image_bgr(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to a ``uint8 (H, W, 3)`` BGR array (OpenCV, as Caffe did).

    Raises:
        ImageReadError: naming the file when it is missing or cannot be decoded.
    """
    import cv2  # here, not at the top: evaluation reads XML files only and does not need OpenCV

    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read image ({exc.strerror})") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ImageReadError(f"{path}: not a decodable image ({data.size} bytes)")
    return image


def read_image_set(devkit_root: str | os.PathLike, subdir: str, image_set: str) -> list[str]:
    """Read ``<devkit_root>/<subdir>/ImageSets/Main/<image_set>.txt`` → image ids.

    Raises:
        DatasetNotFoundError: naming the list file and the expected layout.
    """
    list_path = Path(devkit_root) / subdir / "ImageSets" / "Main" / f"{image_set}.txt"
    if not list_path.is_file():
        raise DatasetNotFoundError(
            f"VOC split list not found: {list_path}; " + _LAYOUT_HELP.format(sub=subdir)
        )
    ids = []
    for line in list_path.read_text().splitlines():
        fields = line.split()
        if fields:
            ids.append(fields[0])
    return ids


def find_devkit_root(root: str | os.PathLike, subdir: str) -> Path:
    """Accept ``root`` as the VOCdevkit folder, its parent, or ``VOCdevkit/<subdir>`` itself.

    Returns the folder that contains ``<subdir>`` (normally ``.../VOCdevkit``).

    Raises:
        DatasetNotFoundError: naming every place that was tried.
    """
    root = Path(root)
    candidates = [root, root / "VOCdevkit"]
    if root.name == subdir:
        candidates.insert(0, root.parent)
    for cand in candidates:
        if (cand / subdir).is_dir():
            return cand
    tried = ", ".join(str(c / subdir) for c in candidates)
    raise DatasetNotFoundError(
        f"VOC folder {subdir!r} not found (looked for {tried}); " + _LAYOUT_HELP.format(sub=subdir)
    )


class _VOCDetection:
    """Detection dataset over one or more VOC ``ImageSets/Main`` lists.

    Args:
        devkit_root: the ``VOCdevkit`` folder (or its parent).
        image_sets: ``[(subdir, list_name), ...]``, e.g. ``[("VOC2007", "trainval")]``.
        classes: foreground class names; ``labels`` are ``classes.index(name) + 1``.
            An object whose name is not in ``classes`` raises :class:`AnnotationError`.
        transform: optional ``transform(image_bgr, target) -> (image, target)``.
        keep_difficult: keep objects flagged difficult (flagged in ``target["difficult"]``).
            Evaluation needs them; SSD's ``use_difficult_gt: true`` trains on them.

    ``self.classes`` is ``("background", *classes)`` so that ``classes[label]`` is the name.
    Annotations are parsed lazily, once per item and worker.

    ``VOCDetection`` is this class with ``torch.utils.data.Dataset`` as a second base,
    built on first access (see the module's ``__getattr__``).
    """

    def __init__(
        self,
        devkit_root: str | os.PathLike,
        image_sets: Sequence[tuple[str, str]],
        classes: Sequence[str] = VOC_CLASSES,
        transform: Optional[Callable] = None,
        keep_difficult: bool = True,
    ) -> None:
        if not image_sets:
            raise ValueError("image_sets is empty")
        self.items: list[tuple[Path, str]] = []  # (folder holding JPEGImages/Annotations, id)
        self.devkit_root = find_devkit_root(devkit_root, image_sets[0][0])
        for subdir, image_set in image_sets:
            folder = find_devkit_root(self.devkit_root, subdir) / subdir
            for image_id in read_image_set(self.devkit_root, subdir, image_set):
                self.items.append((folder, image_id))
        self.image_sets = tuple(image_sets)
        self.classes: tuple[str, ...] = ("background", *classes)
        self._label_of = {name: i + 1 for i, name in enumerate(classes)}
        self.transform = transform
        self.keep_difficult = keep_difficult

    def __len__(self) -> int:
        return len(self.items)

    @property
    def image_ids(self) -> list[str]:
        return [image_id for _, image_id in self.items]

    def annotation_path(self, index: int) -> Path:
        folder, image_id = self.items[index]
        return folder / "Annotations" / f"{image_id}.xml"

    def image_path(self, index: int) -> Path:
        folder, image_id = self.items[index]
        return folder / "JPEGImages" / f"{image_id}.jpg"

    def get_annotation(self, index: int) -> dict:
        """The target of item ``index`` without decoding the image (for evaluation).

        ``orig_size`` comes from the XML ``<size>``.
        """
        ann = parse_voc_xml(self.annotation_path(index))
        return self._target_from(ann, self.items[index][1], (ann.height, ann.width))

    def _target_from(self, ann: VOCAnnotation, image_id: str, hw: tuple[int, int]) -> dict:
        import torch

        boxes, labels, difficult = [], [], []
        for obj in ann.objects:
            if obj.difficult and not self.keep_difficult:
                continue
            label = self._label_of.get(obj.name)
            if label is None:
                raise AnnotationError(
                    f"{ann.path}: unknown class {obj.name!r} (known: {', '.join(self.classes[1:])})"
                )
            boxes.append(obj.bbox_voc)
            labels.append(label)
            difficult.append(obj.difficult)
        return {
            "boxes": torch.from_numpy(voc_to_xyxy(np.array(boxes, dtype=np.float64).reshape(-1, 4))),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "difficult": torch.tensor(difficult, dtype=torch.bool),
            "image_id": image_id,
            "orig_size": torch.tensor(hw, dtype=torch.int64),
        }

    def __getitem__(self, index: int):
        ann = parse_voc_xml(self.annotation_path(index))
        image = read_image_bgr(self.image_path(index))
        target = self._target_from(ann, self.items[index][1], image.shape[:2])
        if self.transform is not None:
            return self.transform(image, target)
        return image, target

    def __repr__(self) -> str:
        sets = " + ".join(f"{s}/{n}" for s, n in self.image_sets)
        return f"VOCDetection({self.devkit_root}, {sets}, {len(self)} images, {len(self.classes) - 1} classes)"


if TYPE_CHECKING:
    class VOCDetection(_VOCDetection, torch.utils.data.Dataset):  # what __getattr__ builds
        pass


def __getattr__(name: str):
    # VOCDetection is a torch Dataset. It is built on first access, so that importing this module (VOC_CLASSES,
    # the XML reader, the evaluator's ground truth: python -m toolkit.evaluate) does not import torch.
    if name == "VOCDetection":
        import torch.utils.data

        cls = type("VOCDetection", (_VOCDetection, torch.utils.data.Dataset),
                   {"__module__": __name__, "__qualname__": "VOCDetection", "__doc__": _VOCDetection.__doc__})
        globals()["VOCDetection"] = cls  # later look-ups (and pickle) find this one class
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
