"""A VOC split's ground truth for the evaluator, read from its XML files and cached.

:func:`read_voc_ground_truth` returns a :class:`~toolkit.evaluation.voc.VOCGroundTruth`
(flat arrays; boxes as written in the XML, VOC 1-based inclusive, float64) for the
images of ``<devkit>/<subdir>/ImageSets/Main/<split>.txt``, difficult objects included.
Each XML file is parsed by :func:`toolkit.data.voc.parse_voc_xml`, the reader of
:class:`~toolkit.data.voc.VOCDetection`, so both see the same objects and raise the
same errors.

The cache
---------
Parsing a split's XML files is most of the time of an evaluation that has read
the detections, and it gives the same arrays until an annotation changes. With
``cache_dir``, the parsed split is kept in
``<cache_dir>/voc-gt/<split>-<hash of the annotations folder and list>.npz``
(numpy arrays, no pickle) together with each XML file's size and modification
time (``st_mtime_ns``). A later call stats every file of the split and reuses a
cached entry only when its size and time are unchanged; the files that changed
(or joined the split) are parsed again and the cache is rewritten. An entry whose
modification time lies within :data:`RACY_NS` of the moment the files were
stat'ed for the cache is parsed again as well: a file edited in the same clock
tick, or within a 2 s timestamp (FAT), as that stat could keep its size and time.

The cache is written to a temporary file in the same folder and renamed into
place (``os.replace``), so a killed run leaves the old cache or the new one,
never a partial file. A cache file that cannot be read, or whose arrays do not
fit together, is ignored and rewritten. The command line's cache folder is
:func:`default_cache_dir` (``$XDG_CACHE_HOME/legacy-det``, else
``~/.cache/legacy-det``); ``--cache-dir`` changes it and ``--no-cache`` turns
the cache off.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from toolkit.data.errors import AnnotationError
from toolkit.data.voc import find_devkit_root, parse_voc_xml, read_image_set
from toolkit.evaluation.voc import VOCGroundTruth

CACHE_FORMAT = 1
"""Version of the cache file's layout; a file of another version is ignored."""

RACY_NS = 2_000_000_000
"""Cached entries modified less than this many ns before the cache's stat are parsed again."""

_ARRAYS = ("format", "stat_ns", "ids", "sizes", "mtimes", "offsets", "boxes_voc", "name_index", "names", "difficult")


def default_cache_dir() -> Optional[Path]:
    """``$XDG_CACHE_HOME/legacy-det``, else ``~/.cache/legacy-det`` (``None`` without a home folder)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return Path(base) / "legacy-det"
    try:
        return Path.home() / ".cache" / "legacy-det"
    except RuntimeError:
        return None


def read_voc_ground_truth(
    devkit_root: str | os.PathLike,
    subdir: str,
    split: str,
    classes: Sequence[str],
    cache_dir: Optional[str | os.PathLike] = None,
) -> VOCGroundTruth:
    """The ground truth of a VOC split, difficult objects included.

    Args:
        devkit_root: the ``VOCdevkit`` folder, its parent, or ``VOCdevkit/<subdir>``
            (as :class:`~toolkit.data.voc.VOCDetection` takes it).
        subdir: ``VOC2007``, ``VOC2012`` (or another sub-folder such as ``SHAPES``).
        split: the ``ImageSets/Main`` list name (``test``, ``val``, ...).
        classes: foreground class names; labels are ``classes.index(name) + 1``.
        cache_dir: where to keep the parsed split (see the module docstring); ``None``: parse every file.
    Returns:
        A :class:`~toolkit.evaluation.voc.VOCGroundTruth` over the split's images in list order
        (an id listed twice counts once).
    Raises:
        DatasetNotFoundError: no such folder or list (naming it and the layout).
        AnnotationError: naming the file, for a missing or malformed XML file or an object
            whose class is not in ``classes``.
    """
    devkit = find_devkit_root(devkit_root, subdir)
    ids = list(dict.fromkeys(read_image_set(devkit, subdir, split)))
    ann_dir = devkit / subdir / "Annotations"
    paths = [ann_dir / f"{image_id}.xml" for image_id in ids]
    stat_ns = time.time_ns()
    sizes, mtimes = _stat_all(paths)
    cache_path = None
    if cache_dir is not None:
        list_path = devkit / subdir / "ImageSets" / "Main" / f"{split}.txt"
        key = f"{ann_dir.resolve()}\0{list_path.resolve()}".encode()
        digest = hashlib.sha1(key, usedforsecurity=False).hexdigest()[:16]
        cache_path = Path(cache_dir) / "voc-gt" / f"{split}-{digest}.npz"
    cached = _load_cache(cache_path) if cache_path is not None else None
    if cached is not None and _fresh(cached, ids, sizes, mtimes):
        arrays = cached
    else:
        arrays = _update(cached, ids, paths, sizes, mtimes, stat_ns)
        if cache_path is not None:
            _write_cache(cache_path, arrays)
    return _to_ground_truth(arrays, paths, classes)


def _stat_all(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """``(sizes, mtimes)``, int64 ``(M,)`` each; ``-1`` for a file that cannot be stat'ed (parsing it will
    raise the error that names it)."""
    sizes = np.full(len(paths), -1, dtype=np.int64)
    mtimes = np.full(len(paths), -1, dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError:
            continue
        sizes[i] = st.st_size
        mtimes[i] = st.st_mtime_ns
    return sizes, mtimes


def _trusted(cached: dict, rows: np.ndarray) -> np.ndarray:
    """Which cached entries ``rows`` are old enough to be judged by size and time (see :data:`RACY_NS`)."""
    return cached["mtimes"][rows] < int(cached["stat_ns"]) - RACY_NS


def _fresh(cached: dict, ids: list[str], sizes: np.ndarray, mtimes: np.ndarray) -> bool:
    """Whether the cache holds exactly these images, each unchanged."""
    if len(cached["ids"]) != len(ids) or cached["ids"].tolist() != ids:
        return False
    every = np.arange(len(ids))
    return bool(np.array_equal(cached["sizes"], sizes) and np.array_equal(cached["mtimes"], mtimes)
                and np.all(sizes >= 0) and np.all(_trusted(cached, every)))


def _update(cached: Optional[dict], ids: list[str], paths: Sequence[Path], sizes: np.ndarray,
            mtimes: np.ndarray, stat_ns: int) -> dict:
    """The cache arrays for ``ids``: unchanged entries of ``cached`` kept, every other file parsed."""
    reuse: dict[str, int] = {}
    if cached is not None:
        position = {image_id: i for i, image_id in enumerate(cached["ids"].tolist())}
        old = np.array([position.get(image_id, -1) for image_id in ids], dtype=np.int64)
        known = old >= 0
        same = np.zeros(len(ids), dtype=bool)
        same[known] = ((cached["sizes"][old[known]] == sizes[known]) & (cached["mtimes"][old[known]] == mtimes[known])
                       & (sizes[known] >= 0) & _trusted(cached, old[known]))
        reuse = {ids[i]: int(old[i]) for i in np.flatnonzero(same)}
    names: dict[str, int] = {}
    boxes, name_index, difficult, counts = [], [], [], []
    for image_id, path in zip(ids, paths):
        k = reuse.get(image_id)
        if k is not None:
            rows = slice(cached["offsets"][k], cached["offsets"][k + 1])
            b = cached["boxes_voc"][rows]
            n = [names.setdefault(name, len(names)) for name in cached["names"][cached["name_index"][rows]].tolist()]
            d = cached["difficult"][rows]
        else:
            objects = parse_voc_xml(path).objects
            b = np.array([o.bbox_voc for o in objects], dtype=np.float64).reshape(-1, 4)
            n = [names.setdefault(o.name, len(names)) for o in objects]
            d = np.array([o.difficult for o in objects], dtype=bool)
        boxes.append(b)
        name_index.extend(n)
        difficult.append(d)
        counts.append(len(n))
    return {
        "format": np.int64(CACHE_FORMAT),
        "stat_ns": np.int64(stat_ns),
        "ids": np.array(ids, dtype=str),
        "sizes": sizes,
        "mtimes": mtimes,
        "offsets": np.concatenate(([0], np.cumsum(counts, dtype=np.int64))),
        "boxes_voc": np.concatenate(boxes) if boxes else np.empty((0, 4)),
        "name_index": np.array(name_index, dtype=np.int64),
        "names": np.array(list(names), dtype=str),
        "difficult": np.concatenate(difficult) if difficult else np.empty(0, dtype=bool),
    }


def _to_ground_truth(arrays: dict, paths: Sequence[Path], classes: Sequence[str]) -> VOCGroundTruth:
    label_of = {name: i + 1 for i, name in enumerate(classes)}
    names = arrays["names"].tolist()
    labels = np.array([label_of.get(name, 0) for name in names], dtype=np.int64)[arrays["name_index"]]
    unknown = np.flatnonzero(labels == 0)
    if len(unknown):
        image = int(np.searchsorted(arrays["offsets"], unknown[0], side="right")) - 1
        name = names[arrays["name_index"][unknown[0]]]
        # VOCDetection's message for the same file.
        raise AnnotationError(f"{paths[image]}: unknown class {name!r} (known: {', '.join(classes)})")
    return VOCGroundTruth(arrays["ids"].astype(object), arrays["offsets"], arrays["boxes_voc"], labels,
                          arrays["difficult"])


def _load_cache(path: Path) -> Optional[dict]:
    """The cache's arrays, or ``None`` when the file is missing, unreadable or inconsistent."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in _ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    try:
        m = len(arrays["ids"])
        n = int(arrays["offsets"][-1])
        ok = (int(arrays["format"]) == CACHE_FORMAT and arrays["ids"].dtype.kind == "U"
              and arrays["sizes"].shape == arrays["mtimes"].shape == (m,) and arrays["offsets"].shape == (m + 1,)
              and arrays["offsets"][0] == 0 and np.all(np.diff(arrays["offsets"]) >= 0)
              and arrays["boxes_voc"].shape == (n, 4) and arrays["name_index"].shape == (n,)
              and arrays["difficult"].shape == (n,) and arrays["difficult"].dtype == bool
              and arrays["names"].dtype.kind == "U"
              and (n == 0 or 0 <= arrays["name_index"].min() <= arrays["name_index"].max() < len(arrays["names"])))
    except (IndexError, TypeError, ValueError):
        ok = False
    return arrays if ok else None


def _write_cache(path: Path, arrays: dict) -> None:
    """Write atomically (a temporary file in the same folder, then ``os.replace``); warn if impossible."""
    import tempfile  # only when writing: its imports cost a cache hit ~10 ms

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        warnings.warn(f"cannot write the ground-truth cache {path}: {exc.strerror or exc}", stacklevel=3)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
