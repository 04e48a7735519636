"""What every sub-tab's gradio code shares: messages, error handling, job buttons, the project.

Handlers never let a :class:`UserError` escape: it becomes the message in the handler's last
output, the other outputs stay as they are, and nothing is printed as a traceback.
"""

from __future__ import annotations

import functools
import html

import gradio as gr

from lorakit_ext.errors import UserError
from lorakit_ext.project import Project, list_projects, open_project

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def js(function_name: str) -> dict:
    """The keyword that runs a JS function before a handler: ``_js`` in gradio 3 (A1111 1.6–1.10),
    ``js`` in gradio 4 (Forge)."""
    return {"js" if GRADIO_MAJOR >= 4 else "_js": function_name}


def ok(text: str) -> str:
    """Plain text for a :func:`message` box, line breaks kept."""
    return html.escape(text).replace("\n", "<br>")


def error(text: str) -> str:
    # A1111's own error box (style.css `.error`), the same one its generate buttons show.
    return f"<div class='error'>{html.escape(text)}</div>"


def keep(n: int) -> list:
    """``n`` outputs left unchanged."""
    return [gr.update() for _ in range(n)]


def guarded(n_outputs: int):
    """Decorator: a :class:`UserError` from the handler becomes the message in its last output."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args):
            try:
                return fn(*args)
            except UserError as exc:
                result = keep(n_outputs - 1) + [error(str(exc))]
                return result[0] if n_outputs == 1 else tuple(result)

        return run

    return wrap


def job_button(button, fn, inputs: list, outputs: list, js_function: str):
    """Wires ``button`` to run ``fn`` as an A1111 job: under A1111's queue lock with its progress
    bar, as txt2img's Generate does. ``js_function`` (javascript/lorakit.js) puts a task id into
    the first input, a hidden :func:`task_id_box`, and starts ``requestProgress`` for it. The last
    output must be the message (:func:`job_message`): A1111 appends "Time taken" to it, and puts
    its own error box there if ``fn`` fails. gradio's own spinner stays off, as on txt2img."""
    from modules.call_queue import wrap_gradio_gpu_call

    if len(outputs) < 2:
        # A1111 unpacks the result with list(): a lone string would become its characters.
        raise ValueError("a job handler needs a message output and at least one other")
    handler = wrap_gradio_gpu_call(guarded(len(outputs))(fn), extra_outputs=keep(len(outputs) - 1))
    return button.click(handler, inputs=inputs, outputs=outputs, show_progress="hidden", **js(js_function))


def projects_root():
    from lorakit_ext.webui import host

    return host.projects_root()


def project_names() -> list[str]:
    return list_projects(projects_root())


def current_project(name: str | None) -> Project:
    if not name:
        raise UserError("choose a project first (or create one above)")
    return open_project(projects_root(), name)


def interrupt_a1111() -> None:
    """An Interrupt button's action for a job that runs as A1111's own (its queue lock held)."""
    from modules import shared

    shared.state.interrupt()


def task_id_box():
    """The hidden input a job button's JS fills with the task id (A1111's dummy component)."""
    return gr.Textbox(visible=False)


def message(elem_id: str):
    """A box for what a handler says. HTML rather than Markdown: messages quote file names and
    paths, whose underscores and asterisks must not turn into emphasis."""
    return gr.HTML(elem_id=elem_id)


def job_message(elem_id: str):
    """The message box of a job button. A1111's progress bar is drawn just above it, positioned
    against its parent, which A1111's ``progress-container`` class makes the reference (as its
    Extensions tab does)."""
    with gr.Row(elem_classes=["progress-container"]):
        return message(elem_id)


def refresh_button(component, choices, elem_id: str):
    """A1111's 🔄 tool button: re-reads ``choices()`` into ``component`` (also for later page loads)."""
    from modules.ui_common import create_refresh_button

    return create_refresh_button(component, lambda: None, lambda: {"choices": choices()}, elem_id)
