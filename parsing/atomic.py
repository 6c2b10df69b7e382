"""Atomic file output: write to a temporary name in the target folder, rename when complete."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


def temporary_path(path: Path) -> Path:
    """Return the temporary name used while ``path`` is being written: ``<name>.tmp-<pid>``."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the folder of ``path`` and rename it onto ``path`` on success.

    The temporary file lives in the same folder, so the final ``os.replace`` is an atomic
    rename on POSIX file systems: readers see either the old file or the complete new one.
    When the block raises (``KeyboardInterrupt`` included), the temporary file is removed and
    ``path`` is left untouched. The parent folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_path(path)
    temp.unlink(missing_ok=True)  # a leftover from an earlier process that had the same pid
    try:
        yield temp
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if not temp.exists():
        raise FileNotFoundError(
            f"the block under atomic_output({str(path)!r}) finished without writing {temp}"
        )
    os.replace(temp, path)
    logger.debug("renamed %s -> %s", temp, path)
