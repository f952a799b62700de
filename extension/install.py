"""Installs what privdiff needs into AUTOMATIC1111's venv (A1111 runs the root ``install.py`` shim at start-up).

A1111 pins its own packages (torch, gradio, transformers, pydantic, fastapi, ...). Every pip call here runs
with a constraints file pinning every package already installed to its installed version, so nothing of
A1111's is upgraded or replaced; a requirement that would need that is reported on one line and skipped,
and the web UI starts regardless. Outside A1111 (ComfyUI-Manager also runs ``install.py``) it does nothing.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

REQUIREMENTS = (
    "opacus>=1.5,<1.7",
    "dp-accounting>=0.4,<0.7",
    "safetensors>=0.4",
    "tqdm",
    "cryptography>=42",
    "filelock>=3.12",
)
"""What the extension's part of privdiff imports (no diffusers, and A1111's own transformers)."""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """{normalised distribution name: version} of this Python's environment."""
    return {_normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
            if d.metadata["Name"]}


def plan(requirements: Iterable[str], installed: dict[str, str],
         satisfied: Callable[[str, str], bool]) -> tuple[list[str], list[str]]:
    """(requirements to pip-install, one-line notices). A requirement already satisfied is skipped; one whose
    package is installed at a version it refuses is not upgraded (the host's version stays) but noticed."""
    to_install, notices = [], []
    for requirement in requirements:
        name = _normalise(re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0])
        version = installed.get(name)
        if version is None:
            to_install.append(requirement)
        elif not satisfied(requirement, version):
            notices.append(f"privdiff: {name} {version} is installed but privdiff wants {requirement}; keeping "
                           f"the web UI's version (privdiff may not work until it is updated)")
    return to_install, notices


def constraints(installed: dict[str, str]) -> str:
    """A pip constraints file pinning every installed distribution to its version."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(installed.items()))


def _satisfied(requirement: str, version: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # without packaging, trust what is installed
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def main() -> None:
    try:
        import launch  # A1111's (and Forge's) launcher
    except ImportError:
        return
    installed = installed_versions()
    to_install, notices = plan(REQUIREMENTS, installed, _satisfied)
    for line in notices:
        print(line, file=sys.stderr)
    if not to_install:
        return
    with tempfile.TemporaryDirectory(prefix="privdiff-install-") as tmp:
        pins = Path(tmp) / "constraints.txt"
        pins.write_text(constraints(installed))
        try:
            quoted = " ".join(f'"{r}"' for r in to_install)
            launch.run_pip(f'install -c "{pins}" {quoted}',
                           f"privdiff requirements: {', '.join(to_install)}")
        except Exception as exc:  # never stop the web UI from starting
            print(f"privdiff: could not install {', '.join(to_install)} ({' '.join(str(exc).split())[:300]})",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
