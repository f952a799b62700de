"""What every sub-tab's logic shares: the :class:`Host` it runs on, progress and Interrupt, one-line errors.

No gradio and no A1111 import in ``extension/logic/``: ``extension/host.py`` implements the Host over A1111's
``modules``, and CI tests the actions with a stand-in host. Every action returns text for the tab; bad input
(PrivdiffError) and Interrupt become one line, and nothing is written or charged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch

from privdiff.errors import PrivdiffError

FORGE_MESSAGE = ("privdiff: running the loaded SD checkpoint on Forge is not supported yet (its model objects differ "
                 "from A1111's); the report, ledger, embedding tools and spectral priors work")

GUIDED_FOLDER = "privdiff-guided"
"""The outputs subfolder of guided and spectral samples."""


class Interrupted(PrivdiffError):
    """The user pressed Interrupt."""


class Host(Protocol):
    """What the tab needs from the web UI (A1111's implementation is ``extension.host.A1111Host``)."""

    forge: bool

    def sd_model(self) -> torch.nn.Module:
        """The loaded checkpoint; raises PrivdiffError when none is loaded."""
        ...

    def embeddings_dir(self) -> Path: ...

    def embedding_names(self) -> set[str]:
        """Names the web UI already resolves in prompts (loaded or skipped embeddings)."""
        ...

    def reload_embeddings(self) -> None: ...

    def default_ledger(self) -> Path: ...

    def loras_dir(self) -> Path:
        """The built-in Lora extension's folder, which ``<lora:NAME:1>`` reads (created)."""
        ...

    def lora_names(self) -> set[str]:
        """Names the built-in Lora extension lists (``<lora:NAME:1>`` finds them)."""
        ...

    def reload_loras(self) -> None:
        """Make the built-in Lora extension list the files in ``loras_dir`` again."""
        ...

    def targets_dir(self) -> Path: ...

    def outputs_dir(self, folder: str = GUIDED_FOLDER) -> Path:
        """Where generated samples go: ``folder`` in the web UI's outputs (created)."""
        ...

    def priors_dir(self) -> Path:
        """Where spectral priors live, public and DP (``<models>/privdiff_priors``, created)."""
        ...

    def checkpoints_dir(self) -> Path:
        """Private state of interrupted fine-tunes (``<data dir>/privdiff/checkpoints``, created; never next to
        outputs)."""
        ...

    def progress(self, label: str) -> Callable[[int, int], None]:
        """A progress callback for the web UI's bar; raises :class:`Interrupted` after Interrupt."""
        ...

    def refresh_button(self, component: Any, choices: Callable[[], list[str]], elem_id: str) -> Any:
        """The web UI's refresh button next to ``component`` (a dropdown), which sets its choices to ``choices()``
        when clicked."""
        ...


def state_progress(state: Any, label: str) -> Callable[[int, int], None]:
    """Progress through A1111's ``shared.state`` (one job; steps = the work's public total), checking
    Interrupt at every step: the exception unwinds the release, so nothing is written or charged."""
    state.job_count, state.job_no, state.textinfo = 1, 0, label

    def progress(done: int, total: int) -> None:
        if state.interrupted:
            raise Interrupted("interrupted: nothing was written and nothing was charged to the ledger")
        state.sampling_steps, state.sampling_step = total, done

    return progress


@contextmanager
def one_line_errors(out: list[str]) -> Iterator[None]:
    """Turn bad input into one line appended to ``out``."""
    try:
        yield
    except PrivdiffError as exc:
        out.append(f"privdiff: {' '.join(str(exc).split())}")


def training_model(host: Host) -> torch.nn.Module:
    """The loaded checkpoint to run privdiff on; one line on Forge or when none is loaded."""
    if host.forge:
        raise PrivdiffError(FORGE_MESSAGE.removeprefix("privdiff: "))
    return host.sd_model()
