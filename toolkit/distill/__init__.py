"""Distillation methods on top of the detectors: ThumbDet's thumbnail losses (:mod:`.thumbdet`)."""
