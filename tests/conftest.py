"""Shared pytest settings: keep every test on one CPU thread so the suite
stays fast and repeatable on small machines."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402  (after the thread variables, so they apply)

torch.set_num_threads(1)
