"""Official DETR-family checkpoints (fundamentalvision/Deformable-DETR) as toolkit models.

* :func:`~converters.detr.checkpoint.model_from_checkpoint` -- an official or toolkit checkpoint as a model;
* :func:`~converters.detr.checkpoint.write_toolkit_checkpoint` -- the toolkit's checkpoint format;
* ``python -m converters.detr`` (convert, run) -- the command line (:mod:`converters.detr.__main__`).
"""

from converters.detr.checkpoint import DETRConversionError, model_from_checkpoint, write_toolkit_checkpoint

__all__ = ["DETRConversionError", "model_from_checkpoint", "write_toolkit_checkpoint"]
