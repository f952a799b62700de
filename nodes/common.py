"""Pieces shared by the privdiff nodes: the release inputs, folders, progress and errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import comfy.utils
import folder_paths
from comfy_api.latest import io

from privdiff.io.atomic import private_folder

CATEGORY = "privdiff"
Dataset = io.Custom("PRIVDIFF_DATASET")


def name_input() -> io.String.Input:
    """The embedding's name, which is also its prompt word."""
    return io.String.Input("name", default="my_dp_style",
                           tooltip="File name in ComfyUI's embeddings folder; prompt with embedding:<name>.")


def privacy_inputs(noise_multiplier: bool = False) -> list:
    """epsilon, delta, (noise_multiplier,) sample_rate, clip_norm, bound."""
    inputs = [
        io.Float.Input("epsilon", default=4.0, min=0.0, max=1000.0, step=0.01, round=False,
                       tooltip="Privacy budget epsilon of this release (smaller = more private, noisier)."
                               + (" 0 when noise_multiplier is set." if noise_multiplier else "")),
        io.Float.Input("delta", default=1e-5, min=1e-12, max=0.1, step=1e-6, round=False,
                       tooltip="Privacy delta; must be below 1/N for N private images."),
    ]
    if noise_multiplier:
        inputs.append(io.Float.Input(
            "noise_multiplier", default=0.0, min=0.0, max=1000.0, step=0.01, round=False,
            tooltip="0: calibrate the noise for epsilon. Otherwise use this sigma (with epsilon 0) and report "
                    "its epsilon."))
    return inputs + [
        io.Float.Input("sample_rate", default=1.0, min=0.001, max=1.0, step=0.001, round=False,
                       tooltip="Poisson sampling rate q: each image is used with probability q."),
        io.Float.Input("clip_norm", default=1.0, min=1e-4, max=100.0, step=0.01, round=False,
                       tooltip="Bound C on each image's contribution (its embedding offset)."),
        io.Combo.Input("bound", options=["clip", "normalize"], default="clip",
                       tooltip="clip: scale longer offsets down to C; normalize: scale every offset to exactly C."),
    ]


def output_inputs() -> list:
    """prompt_template and overwrite."""
    return [
        io.String.Input("prompt_template", default="a painting in the style of {}",
                        tooltip="The prompt output; {} becomes embedding:<name>."),
        io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing embedding of the same name."),
    ]


def optional_release_inputs(public_size: bool = True) -> list:
    """The optional ledger, label and seed inputs (the optional fields of privdiff.app.release_options.Release);
    without ``public_size`` for DP-SGD releases, which treat N as public."""
    inputs = [
        io.Boolean.Input("new_release", default=False, optional=True,
                         tooltip="Off: queueing the same request again returns the earlier release without "
                                 "training or spending budget. On: make a new release (charged again)."),
        io.Int.Input("public_size", default=0, min=0, max=10**9, optional=True,
                     tooltip="0: the guarantee is replace-one and N is public. A size you declare public makes it "
                             "add-remove (the release then divides by this size)."),
        io.String.Input("ledger_path", default="", optional=True,
                        tooltip="Budget ledger JSON kept by you, never shared (empty: ComfyUI's "
                                "user/privdiff/ledger.json)."),
        io.Float.Input("budget_epsilon", default=0.0, min=0.0, max=1000.0, step=0.01, round=False, optional=True,
                       tooltip="Epsilon any one image may spend over all releases in the ledger (0: keep the "
                               "ledger's)."),
        io.Boolean.Input("change_budget", default=False, optional=True,
                         tooltip="Allow budget_epsilon to replace a different budget already in the ledger."),
        io.Boolean.Input("force_budget", default=False, optional=True,
                         tooltip="Release even when the ledger's budget would be exceeded."),
        io.String.Input("dataset_label", default="", optional=True,
                        tooltip="Your label for the dataset, copied into the report."),
        io.Int.Input("reproducible_seed", default=-1, min=-1, max=2**62, control_after_generate=False, optional=True,
                     tooltip="-1: secure randomness. A fixed seed is for debugging: the release is NOT private."),
    ]
    return inputs if public_size else [i for i in inputs if i.id != "public_size"]


def release_outputs() -> list:
    """Outputs of every node that releases a DP embedding."""
    return [
        io.String.Output("prompt", display_name="prompt",
                         tooltip="prompt_template with embedding:<name>; link it to CLIPTextEncode's text."),
        io.String.Output("report", display_name="privacy report", tooltip="The release's privacy report."),
        io.String.Output("embedding_name", display_name="embedding name",
                         tooltip="The file name in the embeddings folder, without extension."),
    ]


def default_ledger() -> Path:
    """The ledger used when the node names none: ComfyUI's user folder, never next to outputs."""
    folder = Path(folder_paths.get_user_directory()) / "privdiff"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "ledger.json"


def embeddings_dir() -> Path:
    """ComfyUI's first embeddings folder, where `embedding:name` finds files."""
    folder = Path(folder_paths.get_folder_paths("embeddings")[0])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def loras_dir() -> Path:
    """ComfyUI's first loras folder, which LoraLoader lists."""
    folder = Path(folder_paths.get_folder_paths("loras")[0])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def targets_dir() -> Path:
    """ComfyUI's models/privdiff_targets folder, where DP style targets are written and looked up."""
    folder = Path(folder_paths.models_dir) / "privdiff_targets"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


PRIORS = "privdiff_priors"


def priors_dir() -> Path:
    """ComfyUI's models/privdiff_priors folder, where spectral priors are written. It is registered with
    folder_paths as "privdiff_priors" (first, .safetensors files), so extra_model_paths.yaml may add folders
    that the prior inputs list too."""
    folder = Path(folder_paths.models_dir) / PRIORS
    folder.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path(PRIORS, str(folder), is_default=True)
    folder_paths.folder_names_and_paths[PRIORS][1].add(".safetensors")
    return folder


def checkpoints_dir() -> Path:
    """Private resumable state of DP fine-tunes: ComfyUI's user/privdiff/checkpoints (0700), never next to
    outputs."""
    return private_folder(Path(folder_paths.get_user_directory()) / "privdiff" / "checkpoints", tighten=True)


def input_path(path: str) -> Path:
    """An absolute path, or one relative to ComfyUI's input folder."""
    p = Path(os.path.expanduser(path.strip()))
    return p if p.is_absolute() else Path(folder_paths.get_input_directory()) / p


def progress_bar() -> Callable[[int, int], None]:
    """A progress callback driving ComfyUI's progress bar; each update is also the cancel point."""
    bar = comfy.utils.ProgressBar(1)

    def progress(done: int, total: int) -> None:
        bar.update_absolute(done, total)

    return progress


def ti_inputs() -> list:
    """The textual-inversion settings of the DP Textual Inversion node and of its audit."""
    return [
        io.Int.Input("vectors", default=1, min=1, max=16, tooltip="Vectors (tokens) in the embedding."),
        io.String.Input("init_word", default="style", tooltip="Public word the embedding starts from."),
        io.Combo.Input("templates", options=["style", "object"], default="style",
                       tooltip="Training prompt templates: a style, or an object/subject."),
        io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Optimiser steps per embedding."),
        io.Float.Input("learning_rate", default=0.005, min=1e-6, max=1.0, step=0.0001, round=False,
                       tooltip="Adam learning rate."),
        io.Int.Input("batch_size", default=8, min=1, max=256,
                     tooltip="Images trained together (dpagg) or expected batch (dpsgd)."),
    ]
