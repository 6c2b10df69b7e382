"""Stage 2 of slfer: the SLFER multi-task model, its trainer and evaluation."""

from importlib import metadata

try:
    __version__ = metadata.version("slfer")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
