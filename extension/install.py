"""Installs what privdiff needs into AUTOMATIC1111's venv (A1111 runs the root ``install.py`` shim at start-up).

A1111 pins its own packages in ``requirements_versions.txt`` (gradio, transformers, pydantic, fastapi, ...)
and installs its torch. Every pip call here runs with a constraints file pinning each of those to its
installed version, so none is upgraded or replaced (other packages may move, as pip resolves them); a
requirement that would need a pinned one to change is reported on one line and skipped, and the web UI
starts regardless. Outside A1111 (ComfyUI-Manager also runs ``install.py``) it does nothing.
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
    "dp-accounting>=0.5,<0.7",
    "safetensors>=0.4",
    "tqdm",
    "cryptography>=42",
    "filelock>=3.12",
    "PyWavelets>=1.4",
    "tenseal>=0.3.14",
)
"""What the extension's part of privdiff imports (no diffusers, and A1111's own transformers)."""

HOST_PACKAGES = ("torch", "torchvision", "torchaudio", "xformers")
"""Installed by the web UI's launcher rather than its requirements file; pinned too."""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """{normalised distribution name: version} of this Python's environment."""
    return {_normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
            if d.metadata["Name"]}


def plan(requirements: Iterable[str], installed: dict[str, str], satisfied: Callable[[str, str], bool],
         host: set[str] | None = None) -> tuple[list[str], list[str]]:
    """(requirements to pip-install, one-line notices). A requirement already satisfied is skipped; one whose
    package is installed at a version it refuses is upgraded, unless the web UI pins that package (``host``;
    None: every installed package counts as pinned), which keeps its version and gets a notice."""
    to_install, notices = [], []
    for requirement in requirements:
        name = _normalise(re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0])
        version = installed.get(name)
        if version is not None and satisfied(requirement, version):
            continue
        if version is not None and (host is None or name in host):
            notices.append(f"privdiff: {name} {version} is pinned by the web UI but privdiff wants {requirement}; "
                           "keeping the web UI's version (privdiff may not work until it is updated)")
        else:
            to_install.append(requirement)
    return to_install, notices


def protected(requirements_file: Path) -> set[str] | None:
    """The packages the web UI pins (``name==version`` lines of its requirements file) and its torch family;
    None when the file is missing (then every installed package is pinned)."""
    if not requirements_file.is_file():
        return None
    names = {_normalise(line.split("==")[0]) for line in requirements_file.read_text().splitlines()
             if "==" in line and not line.lstrip().startswith("#")}
    return names | set(HOST_PACKAGES)


def constraints(installed: dict[str, str], names: set[str] | None = None) -> str:
    """A pip constraints file pinning the installed ``names`` (every installed package when None)."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(installed.items())
                   if names is None or name in names)


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
    host = protected(Path(launch.__file__).resolve().parent / "requirements_versions.txt")
    to_install, notices = plan(REQUIREMENTS, installed, _satisfied, host)
    for line in notices:
        print(line, file=sys.stderr)
    if not to_install:
        return
    with tempfile.TemporaryDirectory(prefix="privdiff-install-") as tmp:
        pins = Path(tmp) / "constraints.txt"
        pins.write_text(constraints(installed, host))
        try:
            quoted = " ".join(f'"{r}"' for r in to_install)
            launch.run_pip(f'install -c "{pins}" {quoted}',
                           f"privdiff requirements: {', '.join(to_install)}")
        except Exception as exc:  # never stop the web UI from starting
            print(f"privdiff: could not install {', '.join(to_install)} ({' '.join(str(exc).split())[:300]})",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
