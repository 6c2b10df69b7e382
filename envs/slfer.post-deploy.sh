#!/usr/bin/env bash
# Install the slfer package (console scripts slfer, slfer-parse, slfer-report) into the
# freshly created environment. Snakemake runs this script once per environment, from
# the directory it was started in, which must be the repository root.
set -euo pipefail
if [[ ! -f pyproject.toml ]] || ! grep -q '^name = "slfer"' pyproject.toml; then
    echo "slfer.post-deploy.sh: run snakemake from the slfer repository root (no slfer pyproject.toml in $PWD)" >&2
    exit 1
fi
python -m pip install --no-deps --editable .
