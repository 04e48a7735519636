"""Registers LoRA Kit with A1111: the tab, the settings and the HTTP API.

Called once per script load. A1111 clears every callback before it reloads scripts, so calling
``register`` again on "Reload UI" does not add duplicates.
"""

from __future__ import annotations

TAB_TITLE = "LoRA Kit"
TAB_ID = "lorakit"


def register() -> None:
    from modules import script_callbacks

    from lorakit_ext.webui import settings

    script_callbacks.on_ui_settings(settings.add_settings)
    script_callbacks.on_ui_tabs(_ui_tabs)
    script_callbacks.on_app_started(_app_started)


def _ui_tabs():
    # Imported here, not at the top: if the tab's code fails, A1111 reports this one callback and
    # the settings and the HTTP API keep working.
    from lorakit_ext.webui import ui

    return [ui.build_tab()]


def _app_started(demo, app) -> None:
    from lorakit_ext.webui import api

    api.mount(app)
