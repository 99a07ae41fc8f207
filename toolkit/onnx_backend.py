"""onnxruntime as a backend: ``toolkit.predict`` / ``toolkit.evaluate --backend onnxruntime`` and the demo.

A detector comes from either

- an ONNX file written by ``python -m toolkit.export``: its ``legacy_det.*`` metadata says the family, the class
  names, the preprocessing and what post-processing the graph holds; or
- a checkpoint (``toolkit.train``, ``converters.caffe convert`` of a native preset, ``converters.detr convert``),
  exported for the run by :func:`export_for_onnxruntime` into a temporary file: raw outputs and a free batch
  axis, so the post-processing after onnxruntime is the PyTorch backend's (``--nms`` applies) and the two
  backends differ only in the network's arithmetic.

:class:`OnnxRuntimeDetector` is an ``nn.Module`` without parameters (the evaluation loop's ``eval()`` /
``train()`` work on it) whose ``forward`` runs the session; :func:`onnx_inference_setup` gives the test transform,
collation and prediction function of its family, as :func:`toolkit.engine.inference_setup` does for PyTorch
models.  A DETR exported at a fixed size takes every image warped to that size (its metadata's ``size_hw``),
not resized with its aspect ratio and padded as the PyTorch backend does.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from toolkit.engine import InferenceSetup

BACKENDS = ("pytorch", "onnxruntime")


class OnnxRuntimeDetector(nn.Module):
    """An exported detector run by onnxruntime's CPU provider.

    ``forward(images float32 (B, 3, H, W))`` returns ``{output name: tensor}``.  Attributes: ``family``
    (``"ssd"``, ``"detr"`` or ``"caffe"``), ``model_name``, ``classes`` (background first; None if the file
    has none), ``postprocess`` (``"none"``, ``"detection_output"``, ``"top<k>"`` or ``"caffe"``),
    ``preprocess`` (a dict), ``input_hw``, ``dynamic_batch``, ``source``.  ``threads``: intra-op threads
    (onnxruntime's default: every core); ``spin=False``: its threads sleep between runs instead of spinning.

    Raises:
        ValueError: not a readable ONNX file, or one ``toolkit.export`` did not write (no metadata).
    """

    def __init__(self, path, threads: Optional[int] = None, spin: bool = True) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        if not spin:
            # onnxruntime's idle threads spin after each run by default, taking the CPU from whatever runs next
            # (the demo times PyTorch right after it).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own message (file, node)
            raise ValueError(f"{path}: onnxruntime cannot load it: {exc}") from None
        meta = {k[len("legacy_det."):]: v for k, v in self.session.get_modelmeta().custom_metadata_map.items()
                if k.startswith("legacy_det.")}
        if "family" not in meta:
            raise ValueError(f"{path}: an ONNX file without legacy_det metadata; only files written by python -m "
                             "toolkit.export say their preprocessing and post-processing")
        self.source = str(path)
        self.family = meta["family"]
        self.model_name = meta.get("model", "onnx")
        self.classes = tuple(json.loads(meta["classes"])) if meta.get("classes") else None
        self.postprocess = meta.get("postprocess", "none")
        self.preprocess = json.loads(meta.get("preprocess") or "{}")
        self.detections_output = meta.get("detections")
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.input_hw = tuple(int(d) for d in first.shape[2:4])
        self.dynamic_batch = not isinstance(first.shape[0], int)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.session.run(None, {self.input_name: images.detach().float().cpu().numpy()})
        return {name: torch.from_numpy(np.asarray(value)) for name, value in zip(self.output_names, outputs)}


def export_for_onnxruntime(checkpoint, folder, model_name: Optional[str] = None,
                           classes: Optional[Sequence[str]] = None) -> Path:
    """``checkpoint`` exported (raw outputs, free batch axis, checked by onnxruntime) to ``folder/model.onnx``.

    Raises:
        ValueError: the checkpoint cannot be read or exported (the exporter's message).
    """
    from toolkit.export import ExportError, export, spec_for_checkpoint

    out = Path(folder) / "model.onnx"
    try:
        export(spec_for_checkpoint(Path(checkpoint), model_name, classes=classes), out, dynamic_batch=True)
    except ExportError as exc:
        raise ValueError(f"{checkpoint}: cannot run it in onnxruntime: {exc}") from None
    return out


def load_onnxruntime_detector(path, model_name: Optional[str] = None, classes: Optional[Sequence[str]] = None,
                              threads: Optional[int] = None) -> OnnxRuntimeDetector:
    """An :class:`OnnxRuntimeDetector` of an ONNX file (``*.onnx``) or of a checkpoint exported for the run
    (:func:`export_for_onnxruntime`; the session holds the model, the temporary file goes).  ``classes``
    (background first) replace the file's names."""
    if Path(path).suffix.lower() == ".onnx":
        detector = OnnxRuntimeDetector(path, threads)
    else:
        with tempfile.TemporaryDirectory(prefix="legacy-det-onnx-") as folder:
            detector = OnnxRuntimeDetector(export_for_onnxruntime(path, folder, model_name, classes), threads)
        detector.source = str(path)
    if classes is not None:
        detector.classes = tuple(classes)
    if detector.classes is None:
        raise ValueError(f"{path}: the file names no classes; give them (a labelmap)")
    return detector


def onnx_inference_setup(detector: OnnxRuntimeDetector, nms: str = "greedy") -> InferenceSetup:
    """The test pipeline of an :class:`OnnxRuntimeDetector` (see :class:`toolkit.engine.InferenceSetup`).

    Raises:
        ValueError: ``nms`` other than greedy for a graph that holds its own post-processing, or for DETR.
    """
    from toolkit.models.postprocess import NMS_KINDS

    if nms not in NMS_KINDS:
        raise ValueError(f"unknown NMS {nms!r}; choose from {NMS_KINDS}")
    batch = 8 if detector.dynamic_batch else 1
    if detector.family == "detr":
        if nms != "greedy":
            raise ValueError(f"--nms {nms}: the DETR family has no NMS")
        from toolkit.data.detr_transforms import DETRFixedSizeTransform
        from toolkit.data.transforms import collate_detection

        return InferenceSetup(DETRFixedSizeTransform(detector.input_hw), collate_detection, _detr_predict, None,
                              batch)
    from toolkit.data.transforms import CaffePreprocess, SSDTestTransform, collate_detection

    pre = detector.preprocess
    if detector.family == "caffe" and detector.postprocess != "caffe":
        raise ValueError(f"{detector.source}: a Caffe net exported without its DetectionOutput top; export it with "
                         "that top among --outputs")
    transform = SSDTestTransform(detector.input_hw, CaffePreprocess(tuple(pre["mean_bgr"]), float(pre["scale"]),
                                                                    pre["channel_order"]))
    if detector.postprocess == "none":
        from toolkit.models.build import default_postprocess

        params = replace(default_postprocess(len(detector.classes)), nms=nms)
        return InferenceSetup(transform, collate_detection, _ssd_predict(params), None, batch)
    if nms != "greedy":
        raise ValueError(f"--nms {nms}: {detector.source} holds its own post-processing (Caffe's DetectionOutput)")
    return InferenceSetup(transform, collate_detection, _rows_predict, None, batch)


def _ssd_predict(params):
    from toolkit.models.postprocess import detection_output

    def run(model: OnnxRuntimeDetector, images: torch.Tensor, device) -> list[dict]:
        out = model(images)
        return detection_output(out["loc"], torch.softmax(out["conf"], dim=-1), out["priors"], out["variances"],
                                params)

    return run


def _rows_predict(model: OnnxRuntimeDetector, images: torch.Tensor, device) -> list[dict]:
    from toolkit.models.postprocess import detections_from_caffe_blob

    out = model(images)
    return detections_from_caffe_blob(out[model.detections_output or "detection_out"], images.shape[0])


def _detr_predict(model: OnnxRuntimeDetector, images: torch.Tensor, device) -> list[dict]:
    from toolkit.models.detr.training import detr_postprocess

    out = model(images)
    if "pred_logits" in out:
        return detr_postprocess(out)
    return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(out["boxes"], out["scores"], out["labels"])]


def evaluate_onnx(detector: OnnxRuntimeDetector, dataset_name: str, data_root=None, metric: str = "voc07",
                  progress: bool = False):
    """AP of ``detector`` on the test split of ``dataset_name`` (its classes must be the dataset's); returns
    :func:`toolkit.engine.evaluate_detector`'s result."""
    from torch.utils.data import DataLoader

    from toolkit.data import build_dataset
    from toolkit.engine import evaluate_detector

    setup = onnx_inference_setup(detector)
    dataset = build_dataset(dataset_name, "test", root=data_root, transform=setup.transform)
    if tuple(dataset.classes) != tuple(detector.classes):
        raise ValueError(f"{detector.source}: classes {detector.classes[1:]}, dataset {dataset_name!r} has "
                         f"{tuple(dataset.classes[1:])}")
    loader = DataLoader(dataset, batch_size=setup.batch_size, shuffle=False, num_workers=0,
                        collate_fn=setup.collate)
    result, _ = evaluate_detector(detector, dataset, loader, None, torch.device("cpu"), metric, progress=progress,
                                  predict_fn=setup.predict_fn)
    return result
