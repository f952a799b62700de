"""Installs what privdiff needs into AUTOMATIC1111's venv (A1111 runs the root ``install.py`` shim at start-up).

It only adds what is missing, never upgrading, downgrading or replacing an installed package, pinned by the web
UI or not: every pip call runs with a constraints file pinning each installed package to its version, one
requirement at a time. Versions follow the torch it finds (opacus 1.5.4+ needs torch 2.4; older torch gets
opacus 1.5.3 at most). A requirement it cannot meet that way is reported in one line and skipped, the tab names it
(:func:`unmet`), and the web UI starts regardless. Outside A1111 (ComfyUI-Manager also runs ``install.py``) it
does nothing.
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

NEEDED_FOR = {
    "opacus": "DP-SGD, Spectral DP and the prv and rdp accountants",
    "dp-accounting": "the pld accountant, which DPAgg textual inversion and DP style targets need (replace-one),",
    "tenseal": "Encrypted denoising",
    "pywavelets": "Spectral DP",
}
"""What is unavailable without a package (the others are needed by every sub-tab)."""

CAPPED = {"dp-accounting": ("absl-py>=1.0,<3", "dm-tree~=0.1.8", "mpmath~=1.2", "scipy~=1.7")}
"""Requirements whose releases cap a dependency below what A1111's venv has (dp-accounting 0.5 and 0.6: attrs<24,
A1111 1.10.1 has attrs 26.1.0, with which privdiff's accountant tests pass), with their other dependencies: when pip
refuses one, those are installed as usual, then it alone (``--no-deps``), so the capped package stays as it is."""

OLD_TORCH_OPACUS = "opacus>=1.5,<1.5.4"
"""The opacus releases that run on torch < 2.4 (1.5.4 registers ``nn.RMSNorm``, new in torch 2.4): 1.5.3 at most."""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(requirement: str) -> str:
    return _normalise(re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0])


def installed_versions() -> dict[str, str]:
    """{normalised distribution name: version} of this Python's environment."""
    return {_normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
            if d.metadata["Name"]}


def requirements(torch_version: str | None) -> list[str]:
    """REQUIREMENTS for the installed torch (``None``: none installed)."""
    release = re.match(r"(\d+)\.(\d+)", torch_version or "")
    old = release is not None and (int(release[1]), int(release[2])) < (2, 4)
    return [OLD_TORCH_OPACUS if old and _name(r) == "opacus" else r for r in REQUIREMENTS]


def _unavailable(name: str) -> str:
    return NEEDED_FOR.get(name, "the privdiff tab")


def _conflict(error: object) -> str:
    """The installed packages pip's refusal names (``attrs==26.1.0``), else the refusal's first 200 characters."""
    pins = sorted(set(re.findall(r"\(constraint\) ([\w.\-]+==\S+)", str(error))))
    return ", ".join(pins) if pins else " ".join(str(error).split())[:200]


def plan(requirements: Iterable[str], installed: dict[str, str],
         satisfied: Callable[[str, str], bool]) -> tuple[list[str], list[str]]:
    """(missing requirements to pip-install, one-line notices). A requirement already satisfied is skipped; one
    whose package is installed at a version it refuses keeps that version and gets a notice."""
    to_install, notices = [], []
    for requirement in requirements:
        name = _name(requirement)
        version = installed.get(name)
        if version is None:
            to_install.append(requirement)
        elif not satisfied(requirement, version):
            notices.append(f"privdiff: {name} {version} is installed but privdiff needs {requirement} (with torch "
                           f"{installed.get('torch', 'missing')}); left unchanged, so {_unavailable(name)} is "
                           "unavailable")
    return to_install, notices


def constraints(installed: dict[str, str]) -> str:
    """A pip constraints file pinning every installed package to its version."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(installed.items()))


def install(run_pip: Callable[[str, str], object], installed: dict[str, str],
            satisfied: Callable[[str, str], bool] | None = None) -> list[str]:
    """pip-install the missing requirements, one at a time, every installed package pinned; the one-line notices
    (requirements left unmet)."""
    to_install, notices = plan(requirements(installed.get("torch")), installed, satisfied or _satisfied)
    if not to_install:
        return notices
    with tempfile.TemporaryDirectory(prefix="privdiff-install-") as tmp:
        pins = Path(tmp) / "constraints.txt"
        pins.write_text(constraints(installed))
        for requirement in to_install:
            try:
                run_pip(f'install -c "{pins}" "{requirement}"', f"privdiff requirement: {requirement}")
            except Exception as exc:  # never stop the web UI from starting
                if not _install_capped(run_pip, pins, requirement):
                    notices.append(f"privdiff: could not install {requirement} without changing an installed package "
                                   f"({_conflict(exc)}), so {_unavailable(_name(requirement))} is unavailable")
    return notices


def _install_capped(run_pip: Callable[[str, str], object], pins: Path, requirement: str) -> bool:
    """Install a CAPPED requirement without its cap; whether it is installed."""
    dependencies = CAPPED.get(_name(requirement))
    if dependencies is None:
        return False
    try:
        for dependency in dependencies:
            run_pip(f'install -c "{pins}" "{dependency}"', f"privdiff requirement: {dependency}")
        run_pip(f'install -c "{pins}" --no-deps "{requirement}"',
                f"privdiff requirement: {requirement} (--no-deps: its caps would change an installed package)")
    except Exception:  # reported by the caller
        return False
    return True


def unmet(installed: dict[str, str] | None = None) -> list[str]:
    """The requirements this environment does not meet, as lines for the tab (empty: all met)."""
    installed = installed_versions() if installed is None else installed
    wanted = requirements(installed.get("torch"))
    missing, notices = plan(wanted, installed, _satisfied)
    return [f"privdiff: {r} is not installed, so {_unavailable(_name(r))} is unavailable" for r in missing] + notices


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
    for line in install(launch.run_pip, installed_versions()):
        print(line, file=sys.stderr)


if __name__ == "__main__":
    main()
