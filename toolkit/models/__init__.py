"""SSD-family detectors and their components: priors, box coding, MultiBoxLoss,
DetectionOutput post-processing, and the model builders."""
