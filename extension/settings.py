"""privdiff's options on A1111's Settings page (read by ``host.py``, added by ``callbacks.py``)."""

from __future__ import annotations

LEDGER_SETTING = "privdiff_ledger_path"
SECTION = ("privdiff", "privdiff")


def on_ui_settings() -> None:
    """privdiff's defaults on A1111's Settings page."""
    from modules import shared

    shared.opts.add_option(LEDGER_SETTING, shared.OptionInfo(
        "", "Budget ledger file (JSON, kept by you and never shared); empty: <data dir>/privdiff/ledger.json",
        section=SECTION))
