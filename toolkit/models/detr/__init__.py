"""The DETR family beside the SSD family: Deformable DETR (Zhu et al., ICLR 2021), with Sparse DETR to follow.

The layout follows the architecture: :mod:`.backbone` (ResNet with frozen batch
norm, masks per level), :mod:`.position_encoding` (sine encoding),
:mod:`.deformable_transformer` (encoder, decoder, two-stage proposals) and
:mod:`.deformable_detr` (the detector, its heads and builders).  Module and
parameter names equal the official repository's state-dict keys, so its
checkpoints load one to one.  The attention op is :mod:`toolkit.ops`.
"""

from toolkit.models.detr.deformable_detr import (DeformableDETR, DeformableDETRConfig, build_deformable_detr,
                                                 flatten_outputs)

__all__ = ["DeformableDETR", "DeformableDETRConfig", "build_deformable_detr", "flatten_outputs"]
