"""Embedding tools: inspect an embedding file of the embeddings folder and convert it between formats."""

from __future__ import annotations

import json

from privdiff.embeddings.files import inspect_embedding, load_embedding, save_planned
from privdiff.errors import PrivdiffError
from privdiff.release.output_plan import FORMATS, SUFFIXES, plan_output

from .common import Host, one_line_errors
from .paths import confined_path, relative_name


def inspect(host: Host, choice: str) -> str:
    """Format, tensors, model family and privacy report of an embedding file."""
    out: list[str] = []
    with one_line_errors(out):
        return json.dumps(inspect_embedding(confined_path([host.embeddings_dir()], choice)), indent=2)
    return out[0]


def convert(host: Host, choice: str, fmt: str, output: str, overwrite: bool) -> str:
    """Convert an embedding file of the embeddings folder to ``fmt`` (one of ``FORMATS``), into that folder: the
    output is a name inside it (empty: the input's name with the format's extension); paths out are refused."""
    out: list[str] = []
    with one_line_errors(out):
        folder = host.embeddings_dir()
        source = confined_path([folder], choice)
        if fmt not in FORMATS:
            raise PrivdiffError(f"unknown embedding format {fmt!r}; choose one of {', '.join(FORMATS)}")
        target = folder / relative_name([folder], output) if output.strip() else source.with_suffix(
            SUFFIXES[fmt][0])
        if not target.parent.resolve().is_relative_to(folder.resolve()):
            raise PrivdiffError(f"output {output.strip()!r} leads out of {folder}")
        plan = plan_output(target, fmt, None, overwrite)
        written = save_planned(load_embedding(source), plan)
        host.reload_embeddings()
        return f"wrote {written} ({plan.fmt})"
    return out[0]
