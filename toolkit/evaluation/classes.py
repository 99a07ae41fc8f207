"""Matching a model's classes to a dataset's by name."""

from __future__ import annotations

from typing import Optional, Sequence

# Label names that stand for no class (COCO's unused category ids in 91-way heads).
UNUSED_NAMES = ("N/A",)
# The same class under PASCAL VOC's and COCO's names (the others differ only in spaces or case, which the
# loose comparison ignores: "diningtable" / "dining table", "pottedplant" / "potted plant").
ALIASES = {"aeroplane": "airplane", "motorbike": "motorcycle", "sofa": "couch", "tvmonitor": "tv"}


class ClassMismatchError(ValueError):
    """A dataset class that no class of the model matches; the message names both lists."""


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in " _-")


def match_classes(model_names: Sequence[str], background_label: Optional[int], dataset_classes: Sequence[str],
                  model_source: str, dataset_name: str, kind: str = "model") -> tuple[dict[int, int], list[str]]:
    """Model label -> dataset label, by class name (exact, else ignoring case and ``_`` / ``-`` / spaces, else
    through the VOC / COCO :data:`ALIASES`, either way).

    Args:
        model_names: the model's name per label.
        background_label: the model's background label (None: none); it and :data:`UNUSED_NAMES` match nothing.
        dataset_classes: the dataset's ``classes`` (background first).
        model_source, dataset_name, kind: for the message (``kind``: what the model is called, e.g. "net").
    Returns:
        ``({model label: dataset label}, model class names the dataset lacks)``.
    Raises:
        ClassMismatchError: a dataset class no model class matches (every such class named, with both lists).
    """
    foreground = {label: name for label, name in enumerate(model_names)
                  if label != background_label and name not in UNUSED_NAMES}
    exact = {name: label for label, name in foreground.items()}
    loose = {_key(name): label for label, name in foreground.items()}
    aliases = {**{_key(a): _key(b) for a, b in ALIASES.items()}, **{_key(b): _key(a) for a, b in ALIASES.items()}}
    mapping, unmatched = {}, []
    for j, name in enumerate(dataset_classes):
        if j == 0:
            continue
        label = exact.get(name, loose.get(_key(name), loose.get(aliases.get(_key(name), ""))))
        if label is None or label in mapping:
            unmatched.append(name)
        else:
            mapping[label] = j
    if unmatched:
        raise ClassMismatchError(
            f"the {kind}'s classes (from {model_source}) do not match dataset {dataset_name!r}'s: no {kind} class for "
            f"{unmatched}; the {kind} has {list(foreground.values())}, the dataset {list(dataset_classes[1:])} "
            f"(give the {kind}'s labelmap with --labelmap)")
    extra = [name for label, name in foreground.items() if label not in mapping]
    return mapping, extra
