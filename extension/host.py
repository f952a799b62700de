"""The tab's Host over AUTOMATIC1111's ``modules`` (imported only here, and only inside A1111)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from privdiff.errors import PrivdiffError
from privdiff.io.atomic import private_folder

from .logic.common import GUIDED_FOLDER, state_progress
from .settings import LEDGER_SETTING


def is_forge() -> bool:
    """Whether the web UI is Forge (it ships ``modules_forge`` next to A1111's ``modules``)."""
    return importlib.util.find_spec("modules_forge") is not None


def _networks() -> Any:
    """The built-in Lora extension's ``networks`` module (on ``sys.path`` while that extension is enabled)."""
    try:
        import networks
    except ImportError:
        raise PrivdiffError("the built-in Lora extension is disabled: enable it in Extensions to use DP LoRA files") \
            from None
    return networks


class A1111Host:
    """A1111's model, folders, embedding database, settings and progress state."""

    def __init__(self) -> None:
        self.forge = is_forge()

    def sd_model(self) -> torch.nn.Module:
        from modules import shared

        model = shared.sd_model  # A1111 loads the selected checkpoint on first access
        if model is None:
            raise PrivdiffError("no checkpoint is loaded: pick one in the Stable Diffusion checkpoint menu")
        return model

    def embeddings_dir(self) -> Path:
        from modules import shared

        folder = Path(shared.cmd_opts.embeddings_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _database(self) -> Any:
        """A1111's textual-inversion embedding database."""
        from modules import sd_hijack

        return sd_hijack.model_hijack.embedding_db

    def embedding_names(self) -> set[str]:
        db = self._database()
        return set(db.word_embeddings) | set(db.skipped_embeddings)

    def reload_embeddings(self) -> None:
        self._database().load_textual_inversion_embeddings(force_reload=True)

    def loras_dir(self) -> Path:
        from modules import shared

        folder = Path(shared.cmd_opts.lora_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def lora_names(self) -> set[str]:
        return set(_networks().available_networks)

    def reload_loras(self) -> None:
        _networks().list_available_networks()

    def default_ledger(self) -> Path:
        """The Settings page's ledger, else ``<data dir>/privdiff/ledger.json`` (never next to outputs)."""
        from modules import paths_internal, shared

        configured = str(getattr(shared.opts, LEDGER_SETTING, "") or "").strip()
        default = Path(paths_internal.data_path) / "privdiff" / "ledger.json"
        path = Path(configured).expanduser() if configured else default
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def targets_dir(self) -> Path:
        from modules import paths_internal

        folder = Path(paths_internal.models_path) / "privdiff_targets"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def priors_dir(self) -> Path:
        """Spectral priors, public and DP: ``<models>/privdiff_priors``."""
        from modules import paths_internal

        folder = Path(paths_internal.models_path) / "privdiff_priors"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def checkpoints_dir(self) -> Path:
        """Private state of interrupted spectral fine-tunes: ``<data dir>/privdiff/checkpoints`` (never next to
        outputs or priors), 0700."""
        from modules import paths_internal

        return private_folder(Path(paths_internal.data_path) / "privdiff" / "checkpoints", tighten=True)

    def outputs_dir(self, folder: str = GUIDED_FOLDER) -> Path:
        """``folder`` in the txt2img outputs (or the one folder for all images, when Settings names one)."""
        from modules import shared

        path = Path(shared.opts.outdir_samples or shared.opts.outdir_txt2img_samples) / folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    def progress(self, label: str) -> Callable[[int, int], None]:
        from modules import shared

        return state_progress(shared.state, label)

    def refresh_button(self, component: Any, choices: Callable[[], list[str]], elem_id: str) -> Any:
        from modules.ui_common import create_refresh_button

        return create_refresh_button(component, lambda: None, lambda: {"choices": choices()}, elem_id)
