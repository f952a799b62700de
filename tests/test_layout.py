"""The layout stays the architecture (docs/architecture.md): no import cycle, and imports only run down the layers.

Walks the AST of every module in privdiff/, nodes/ and extension/ (module-level and function-level imports,
``TYPE_CHECKING`` ones included). ``PRIVDIFF_LAYOUT_ROOT`` points it at another checkout.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(os.environ.get("PRIVDIFF_LAYOUT_ROOT", Path(__file__).resolve().parent.parent))

LAYERS = {
    "privdiff": 0, "privdiff.errors": 0, "privdiff.progress": 0,  # used by every layer
    "privdiff.privacy": 1, "privdiff.io": 1, "privdiff.images": 1,  # images: deprecated re-export
    "privdiff.models": 2, "privdiff.release": 2, "privdiff.backends": 2,  # backends: deprecated re-exports
    "privdiff.embeddings": 3, "privdiff.guidance": 3, "privdiff.wavelet": 3, "privdiff.he": 3, "privdiff.lora": 3,
    "privdiff.app": 4, "privdiff.audit": 4,  # what the fronts share; audits run the methods' releases
    "privdiff.cli": 5, "privdiff.__main__": 5,
    "privdiff.demo": 6, "privdiff.reference": 6,
    "nodes": 7, "extension": 7,
}
"""The layer of each package (or top-level module): a module may import its own layer or lower ones."""

PEERS_APART = {3, 7}
"""Layers whose packages never import one another: one method never imports another, nor one front another."""

HOSTS = {"nodes", "extension", "comfy", "comfy_extras", "folder_paths", "server", "modules", "gradio"}
"""Top-level names privdiff must never import: the fronts and their hosts."""

TOP_MODULES = {"__init__", "__main__", "errors", "progress", "images"}
"""The only modules at the top of privdiff/ beside its packages (images: a deprecated re-export)."""


def _modules(package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _graph(packages: tuple[str, ...]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between the project's modules, every imported name) per module of ``packages``."""
    modules = {name: path for package in packages for name, path in _modules(package).items()}
    imported = {name: _imports(name, path) for name, path in modules.items()}
    edges = {name: {target for target in names if target in modules and target != name}
             for name, names in imported.items()}
    return edges, imported


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _unit(module: str) -> str:
    """The entry of LAYERS that ``module`` belongs to (its longest declared prefix)."""
    parts = module.split(".")
    shortest = 1 if module == "privdiff" or parts[0] != "privdiff" else 2  # privdiff.X: X itself is declared
    for n in range(len(parts), shortest - 1, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} is in no layer: declare its package in LAYERS (tests/test_layout.py)")


def _upward(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            here, there = _unit(source), _unit(target)
            if LAYERS[there] > LAYERS[here]:
                bad.append(f"{source} (layer {LAYERS[here]}) imports {target} (layer {LAYERS[there]})")
            elif LAYERS[there] == LAYERS[here] in PEERS_APART and there != here:
                bad.append(f"{source} imports {target}: peers in layer {LAYERS[here]} stay apart")
    return bad


def test_privdiff_and_nodes_have_no_import_cycle() -> None:
    edges, _ = _graph(("privdiff", "nodes"))
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_privdiff_and_nodes_import_only_down_the_layers() -> None:
    edges, _ = _graph(("privdiff", "nodes"))
    bad = _upward(edges)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_privdiff_never_imports_a_front_or_a_host() -> None:
    _, imported = _graph(("privdiff",))
    bad = sorted(f"{module} imports {name}" for module, names in imported.items() for name in names
                 if name.partition(".")[0] in HOSTS)
    assert not bad, "\n".join(bad)


def test_the_top_of_privdiff_holds_packages_and_a_few_shared_modules() -> None:
    loose = sorted(p.stem for p in (ROOT / "privdiff").glob("*.py") if p.stem not in TOP_MODULES)
    assert not loose, f"loose modules at the top of privdiff/: {loose}; move each into the package it belongs to"


def test_extension_has_no_import_cycle_and_imports_only_down() -> None:
    edges, _ = _graph(("privdiff", "nodes", "extension"))
    problems = [" <-> ".join(c) for c in _cycles(edges) if c[0].startswith("extension")]
    problems += [line for line in _upward(edges) if line.startswith("extension")]
    assert not problems, "\n".join(problems)


EXTENSION_GLUE = {"callbacks", "settings", "host", "api", "ui", "tabs", "register", "install"}
"""The extension modules that may import A1111, gradio or FastAPI; ``logic/`` and ``a1111_backend`` sit below them."""


def test_the_extensions_logic_and_backend_import_none_of_the_web_uis_glue() -> None:
    edges, _ = _graph(("extension",))
    bad = sorted(f"{source} imports {target}" for source, targets in edges.items()
                 if source.startswith(("extension.logic", "extension.a1111_backend"))
                 for target in targets if target.split(".")[1] in EXTENSION_GLUE)
    assert not bad, "\n".join(bad)


def _says_it_is_one_cohesive_thing(source: str) -> bool:
    return "one cohesive thing" in (ast.get_docstring(ast.parse(source)) or "").lower()


def test_no_source_module_is_over_400_lines_unless_it_says_it_is_one_cohesive_thing() -> None:
    sources = {path: path.read_text(encoding="utf-8") for package in ("privdiff", "nodes", "extension")
               for path in (ROOT / package).rglob("*.py")}
    long = sorted(f"{path} ({len(text.splitlines())} lines)" for path, text in sources.items()
                  if len(text.splitlines()) > 400 and not _says_it_is_one_cohesive_thing(text))
    assert not long, "split these, or say in the docstring why each is one cohesive thing:\n" + "\n".join(long)


def test_the_readme_import_paths_of_the_old_layout_still_import() -> None:
    """Deprecated re-exports, kept for one release: the paths the README named before the move."""
    from privdiff.backends.diffusers_backend import DiffusersBackend
    from privdiff.backends.tiny import load_model
    from privdiff.images import load_image_folder
    from privdiff.io.images import load_image_folder as moved_loader
    from privdiff.models.diffusers_backend import DiffusersBackend as moved_backend
    from privdiff.models.registry import load_model as moved_load_model

    assert (DiffusersBackend, load_model, load_image_folder) == (moved_backend, moved_load_model, moved_loader)
