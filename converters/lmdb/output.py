"""Outputs that appear complete or not at all: written beside the target, renamed at the end.

A conversion writes into ``<parent>/.<name>.tmp-<pid>`` and renames it to
``<parent>/<name>`` only when it has finished, so a killed or failed run never
leaves a half-written file or LMDB where the user expects a finished one.  A
failed run removes its temporary (a ``kill -9`` cannot; the next run into the
same place removes temporaries whose process is gone).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from toolkit.data.errors import DatasetError


class OutputExistsError(DatasetError, FileExistsError):
    """The output path exists and ``overwrite`` was not given."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process, or we cannot tell: leave its files alone
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temporaries(target: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` siblings of ``target`` left by processes that are gone."""
    prefix = f".{target.name}.tmp-"
    if not target.parent.is_dir():
        return
    for path in target.parent.iterdir():
        pid = path.name[len(prefix):] if path.name.startswith(prefix) else ""
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            _remove(path)


def temporary_path(target: Path) -> Path:
    """``<parent>/.<name>.tmp-<pid>``: where :func:`atomic_output` writes ``target``."""
    return target.parent / f".{target.name}.tmp-{os.getpid()}"


def check_writable(target: Path, overwrite: bool) -> None:
    """Refuse an existing ``target`` unless ``overwrite`` (before any work is done)."""
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists; remove it or pass --overwrite")
    if not target.parent.is_dir():
        raise DatasetError(f"cannot write {target}: folder {target.parent} does not exist")


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, *, overwrite: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``target`` into; rename it into place on success.

    Args:
        target: the final file or folder.
        overwrite: replace an existing ``target`` (only once the new one is complete).
        directory: create the temporary as an empty folder (else nothing is created).
    Raises:
        OutputExistsError: ``target`` exists and not ``overwrite``.
    """
    target = Path(target)
    check_writable(target, overwrite)
    remove_stale_temporaries(target)
    tmp = temporary_path(target)
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            if not overwrite:  # appeared while we worked
                raise OutputExistsError(f"{target} appeared while it was being written; result left in {tmp}")
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    except OutputExistsError:
        raise
    except BaseException:
        _remove(tmp)
        raise
