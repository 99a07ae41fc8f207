"""toolkit.engine helpers that the trainer tests do not reach directly."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from toolkit import engine


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_applies_on_glibc_and_allocation_still_works():
    # In a child process: the settings stay with the process that made them.
    code = (
        "import torch\n"
        "from toolkit.engine import keep_freed_memory\n"
        "assert keep_freed_memory() is True\n"
        "xs = [torch.ones(4 * 2**20 // 4) * i for i in range(8)]\n"  # 4 MiB blocks, freed and reused
        "del xs\n"
        "ys = [torch.zeros(40 * 2**20 // 4) for _ in range(2)]\n"  # above the 32 MiB threshold: still mmap
        "assert sum(float(y.sum()) for y in ys) == 0.0\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_keep_freed_memory_changes_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", "1.2"))
    assert engine.keep_freed_memory() is False
