"""Procedural synthetic face dataset for demos and tests.

Each image shows one of the seven expressions through face geometry and comes
with an exact 19-class face-part label map drawn from the same polygons.
``generate_dataset`` writes the dataset, ``add_commands`` registers the
``synth`` and ``synth-figure`` subcommands of ``slfer-parse``.
"""

from parsing.synthetic.commands import add_commands
from parsing.synthetic.dataset import GENERATOR_VERSION, generate_dataset, read_manifest, render_task
from parsing.synthetic.faces import FaceParams, GeneratorConfig, sample_face_params
from parsing.synthetic.figure import write_figure
from parsing.synthetic.render import render_face

__all__ = [
    "GENERATOR_VERSION",
    "FaceParams",
    "GeneratorConfig",
    "add_commands",
    "generate_dataset",
    "read_manifest",
    "render_face",
    "render_task",
    "sample_face_params",
    "write_figure",
]
