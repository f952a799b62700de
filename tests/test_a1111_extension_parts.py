"""The extension's shared pieces: typed form fields (logic/forms.py) and the sub-tabs' widgets (tabs/widgets.py)."""

import sys
from types import SimpleNamespace

import pytest

from extension.logic import forms
from extension.tabs import widgets
from privdiff.errors import PrivdiffError


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
