"""The extension's layout: imports run one way (no cycle, the sub-tabs' logic below the web UI's glue), small
modules, and the pieces its split put on their own (form fields, tab widgets)."""

import ast
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from extension.logic import forms
from extension.tabs import widgets
from privdiff.errors import PrivdiffError

EXTENSION = Path(__file__).resolve().parents[1] / "extension"
GLUE = {"callbacks", "settings", "host", "api", "ui", "tabs", "register", "install"}
"""What may import A1111, gradio or FastAPI; ``logic`` and ``a1111_backend`` import none of it."""


def _module(path: Path) -> str:
    parts = ("extension", *path.relative_to(EXTENSION).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The extension modules ``path`` imports, at its top or inside a function."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:package.count(".") + 2 - node.level]
                base = ".".join([*anchor, base] if base else anchor)
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module(p): p for p in EXTENSION.rglob("*.py")}
    return {name: _imports(path) & set(paths) - {name} for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (empty: none), by depth-first search."""
    done, path = set(), []

    def visit(node: str) -> list[str]:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return []
        path.append(node)
        for target in sorted(graph[node]):
            found = visit(target)
            if found:
                return found
        path.pop()
        done.add(node)
        return []

    for node in sorted(graph):
        found = visit(node)
        if found:
            return found
    return []


def test_the_extension_has_no_import_cycle():
    assert _cycle(_graph()) == []


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_logic_and_the_backend_import_nothing_of_the_web_uis_glue():
    for name, targets in _graph().items():
        if name.startswith(("extension.logic", "extension.a1111_backend")):
            glue = {t for t in targets if "." in t and t.split(".")[1] in GLUE}
            assert not glue, f"{name} imports {glue}"


def test_no_extension_module_is_over_400_lines():
    long = {p.name: n for p in EXTENSION.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


@pytest.mark.parametrize(("value", "wanted"), [(3, 3), (3.0, 3), (-1, -1), (10, 10)])
def test_whole_takes_whole_numbers_in_range(value, wanted):
    assert forms.whole("steps", value, -1, 10) == wanted


@pytest.mark.parametrize(("value", "line"), [
    (2.5, "steps must be a whole number, got 2.5"), (True, "steps must be a whole number, got True"),
    (float("nan"), "steps must be a whole number, got nan"), ("3", "steps must be a whole number, got '3'"),
    (11, "steps must be between -1 and 10, got 11"), (-2, "steps must be between -1 and 10, got -2"),
])
def test_whole_refuses_in_one_line_naming_the_field(value, line):
    with pytest.raises(PrivdiffError) as refused:
        forms.whole("steps", value, -1, 10)
    assert str(refused.value) == line


def test_number_takes_finite_numbers_only():
    assert forms.number("cfg", 7) == 7.0 and type(forms.number("cfg", 7)) is float
    for bad in (float("inf"), float("nan"), False, "7", None):
        with pytest.raises(PrivdiffError, match="^cfg must be a finite number"):
            forms.number("cfg", bad)


@pytest.mark.parametrize(("version", "key"), [("3.41.2", "_js"), ("4.40.0", "js")])
def test_progress_js_uses_the_click_keyword_of_the_gradio_it_finds(monkeypatch, version, key):
    monkeypatch.setitem(sys.modules, "gradio", SimpleNamespace(__version__=version))
    (name, code), = widgets.progress_js("privdiff_ti_status").items()
    assert name == key and "getElementById('privdiff_ti_status')" in code and "args[0] = id" in code


def test_status_html_marks_errors_and_escapes():
    assert widgets.status_html("") == ""
    assert widgets.status_html("privdiff: bad <input>") == "<p class='error'>privdiff: bad &lt;input&gt;</p>"
    assert widgets.status_html("wrote a & b") == "<p class='privdiff-ok'>wrote a &amp; b</p>"
