"""BiSeNet face-parser weights: strict loading, checking and download.

The weights are facexlib's release file ``parsing_bisenet.pth`` (v0.2.0, about 53 MB, no
published checksum). It is a plain state_dict that descends from zllrunning/face-parsing.PyTorch's
``79999_iter.pth`` (MIT licence). A model is only ever built from a file that loads with
``strict=True``; nothing here falls back to random or partial weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from facexlib.parsing.bisenet import BiSeNet
from tqdm import tqdm

from parsing.atomic import atomic_output
from parsing.labels import FACE_PARTS_19

logger = logging.getLogger(__name__)

FACEXLIB_BISENET_URL = "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth"
WEIGHTS_HINT = (
    "Get facexlib's BiSeNet weights (parsing_bisenet.pth, about 53 MB, converted from "
    "zllrunning/face-parsing.PyTorch 79999_iter.pth, MIT licence) with "
    f"`slfer-parse download-weights --out PATH` or from {FACEXLIB_BISENET_URL}"
)
_CHUNK_BYTES = 1 << 20
_MAX_LISTED_KEYS = 5


class WeightsError(ValueError):
    """Raised when a weights file is missing or does not load strictly into BiSeNet."""


def sha256_file(path: str | os.PathLike) -> str:
    """Return the sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_tensor_mapping(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(key, str) and isinstance(item, torch.Tensor) for key, item in value.items())
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a BiSeNet state_dict from ``path`` with ``torch.load(weights_only=True)``.

    Besides the plain state_dict of facexlib's release file, two common checkpoint layouts are
    accepted: a ``{"state_dict": {...}}`` wrapper, and keys that all carry the ``module.`` prefix
    of ``torch.nn.DataParallel``. Unwrapping them is unambiguous, and the strict load that
    follows still checks every tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"BiSeNet weights not found: {path}. {WEIGHTS_HINT}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # torch.load raises many types on bad files (KeyError, EOFError, RuntimeError, UnpicklingError).
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(f"{path} is not a readable PyTorch weights file ({first_line}). {WEIGHTS_HINT}") from error

    if isinstance(loaded, Mapping) and not _is_tensor_mapping(loaded) and _is_tensor_mapping(loaded.get("state_dict")):
        logger.info("%s: using the 'state_dict' entry of a checkpoint dict", path)
        loaded = loaded["state_dict"]
    if not _is_tensor_mapping(loaded):
        raise WeightsError(
            f"{path} does not contain a state_dict (a mapping of parameter names to tensors); "
            f"it contains {type(loaded).__name__}. {WEIGHTS_HINT}"
        )
    state = dict(loaded)
    if all(key.startswith("module.") for key in state):
        logger.info("%s: removing the 'module.' prefix of DataParallel from every key", path)
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def _listed(keys: list[str]) -> str:
    listed = ", ".join(keys[:_MAX_LISTED_KEYS])
    return listed + (f", ... ({len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else "")


def build_bisenet(path: str | os.PathLike) -> tuple[BiSeNet, str]:
    """Build facexlib's ``BiSeNet(num_class=19)`` from a weights file, loaded with ``strict=True``.

    Returns the model in eval mode on the CPU and the file's sha256. Raises WeightsError naming
    missing keys, unexpected keys and shape mismatches.
    """
    state = read_state_dict(path)
    model = BiSeNet(num_class=len(FACE_PARTS_19))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{key} {list(state[key].shape)} (expected {list(expected[key].shape)})"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es): {_listed(wrong_shape)}")
    if problems:
        raise WeightsError(
            f"{path} does not load into facexlib BiSeNet(num_class=19): {'; '.join(problems)}. {WEIGHTS_HINT}"
        )
    model.load_state_dict(state, strict=True)
    sha256 = sha256_file(path)
    logger.info("loaded BiSeNet weights %s (%d tensors, sha256 %s)", path, len(state), sha256)
    return model.eval(), sha256


def check_weights(path: str | os.PathLike, expected_sha256: str | None = None) -> dict[str, Any]:
    """Check that ``path`` loads strictly into BiSeNet (and has ``expected_sha256`` when given).

    Returns a summary: path, sha256, number of tensors and number of parameters.
    """
    model, sha256 = build_bisenet(path)
    if expected_sha256 is not None and sha256 != expected_sha256.lower():
        raise WeightsError(f"{path} has sha256 {sha256}, expected {expected_sha256.lower()}")
    return {
        "path": str(path),
        "sha256": sha256,
        "tensors": len(model.state_dict()),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
    }


def download_weights(
    out_path: str | os.PathLike,
    url: str = FACEXLIB_BISENET_URL,
    expected_sha256: str | None = None,
    timeout: float = 60.0,
) -> str:
    """Download BiSeNet weights from ``url`` to ``out_path`` and return their sha256.

    The file is streamed to a temporary name beside ``out_path`` and renamed only after it
    loads strictly into BiSeNet (and matches ``expected_sha256`` when given). The digest is
    also written to ``<out_path>.sha256`` in ``sha256sum`` format.
    """
    out_path = Path(out_path)
    logger.info("downloading %s to %s", url, out_path)
    with atomic_output(out_path) as temp_path:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(temp_path, "wb") as stream:
                length = response.headers.get("Content-Length")
                with tqdm(total=int(length) if length else None, unit="B", unit_scale=True, desc=out_path.name) as bar:
                    for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                        stream.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except urllib.error.URLError as error:
            raise WeightsError(f"download of {url} failed: {error.reason}") from error
        sha256 = digest.hexdigest()
        try:
            check_weights(temp_path, expected_sha256)
        except WeightsError as error:
            raise WeightsError(f"the file downloaded from {url} is not usable: {error}") from error

    with atomic_output(out_path.with_name(out_path.name + ".sha256")) as temp_path:
        temp_path.write_text(f"{sha256}  {out_path.name}\n", encoding="utf-8")
    logger.info("saved %s (sha256 %s)", out_path, sha256)
    return sha256
