"""Atomic file output: write to a temporary name in the target folder, rename when complete.

A reader (or a workflow manager checking for an output) never reads a half-written
file, because ``os.replace`` within one folder is atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and rename it onto ``path`` when the block succeeds.

    The temporary file is removed when the block raises, so a failed write leaves
    any earlier version of ``path`` untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the target's suffix, so writers that infer the format from
    # it (matplotlib's savefig) write the right one: ".figure4.tmp-abc123.png".
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.stem}.tmp-", suffix=target.suffix, dir=target.parent)
    os.close(handle)
    temp_path = Path(temp_name)
    try:
        yield temp_path
        os.replace(temp_path, target)
    finally:
        if temp_path.exists():
            temp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_output(path) as temp_path:
        temp_path.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def save_torch(path: str | os.PathLike, payload: Any) -> None:
    """Save ``payload`` with ``torch.save`` to ``path`` atomically."""
    with atomic_output(path) as temp_path:
        torch.save(payload, temp_path)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Save ``arrays`` as an uncompressed ``.npz`` file at ``path`` atomically."""
    with atomic_output(path) as temp_path:
        # np.savez appends ".npz" to names without it, so write through a file object.
        with open(temp_path, "wb") as stream:
            np.savez(stream, **arrays)
