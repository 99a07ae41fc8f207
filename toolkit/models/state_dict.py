"""State-dict checks shared by every loader of weights from a file (models, trainer, converters)."""

from __future__ import annotations

from typing import Callable


def state_dict_mismatch(own: dict, theirs: dict, may_miss: Callable[[str], bool] = lambda key: False,
                        limit: int = 6) -> list[str]:
    """What keeps ``theirs`` (a state dict read from a file) from loading into a model whose state dict is ``own``:
    one line each for the missing keys (unless ``may_miss(key)``), the unexpected ones and those of another shape
    (``"key (file shape) vs (model shape)"``), at most ``limit`` named per line.  Empty when it loads."""
    def shown(keys: list[str]) -> str:
        return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")

    missing = [k for k in own if k not in theirs and not may_miss(k)]
    unexpected = [k for k in theirs if k not in own]
    misshapen = [f"{k} {tuple(theirs[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in theirs and tuple(theirs[k].shape) != tuple(own[k].shape)]
    return [f"{len(keys)} {what}: {shown(keys)}" for what, keys in
            (("missing", missing), ("unexpected", unexpected), ("of another shape", misshapen)) if keys]
