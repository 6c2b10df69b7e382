"""Stage 1 of slfer: dataset readers, the image cache, face parsing and mask archives."""

from importlib import metadata

try:
    __version__ = metadata.version("slfer")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
