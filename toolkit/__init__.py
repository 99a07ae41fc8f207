"""legacy-det's PyTorch toolkit: datasets, SSD augmentation, evaluation (and, as they land,
models, training and custom ops).

``toolkit`` never imports ``converters`` or ``apps``; they import it.
"""

__version__ = "0.1.0"
