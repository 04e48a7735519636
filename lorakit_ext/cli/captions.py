"""``captions PROJECT [show | set NAME TEXT | lint [--trigger T]]``."""

from __future__ import annotations


from lorakit_ext.cli.output import Result
from lorakit_ext.dataset.captions import read_captions, write_caption
from lorakit_ext.dataset.files import is_image_name
from lorakit_ext.dataset.tags import lint_captions
from lorakit_ext.errors import UserError
from lorakit_ext.models.clip_tokenizer import clip_token_counter, load_clip_tokenizer
from lorakit_ext.project import Project, open_project

ACTIONS = ("show", "set", "lint")


def register(sub, common) -> None:
    # One flat parser rather than nested sub-commands: a nested parser re-applies the defaults of
    # --root/--json over values given before it.
    p = sub.add_parser(
        "captions",
        parents=[common],
        help="show, set or lint a project's captions",
        description="show: every image's caption. set NAME TEXT: write one image's caption. "
        "lint: empty captions, captions missing the trigger, and captions over 75 CLIP tokens "
        "(exit status 1 when it finds any).",
    )
    p.add_argument("project", help="an existing project")
    p.add_argument("action", nargs="?", default="show", choices=ACTIONS, help="show (default), set or lint")
    p.add_argument("values", nargs="*", metavar="NAME TEXT", help="for set: the image file name and its caption")
    p.add_argument("--trigger", default="", help="for lint: the activation tag(s) every caption should start with")
    p.set_defaults(handler=run)
    # add_parser builds every command with one parser class; only this one has optional positionals.


def _show(project: Project) -> Result:
    reads = read_captions(project)
    warnings = [r.warning for r in reads.values() if r.warning]
    lines = [f"{name}: {r.text}" if r.text else f"{name}: (no caption)" for name, r in reads.items()]
    if not reads:
        lines.append(f"no images in {project.dataset}")
    lines += [f"warning: {w}" for w in warnings]
    data = {"captions": {name: r.text for name, r in reads.items()}, "warnings": warnings}
    return Result(data, "\n".join(lines))


def _set(project: Project, name: str, text: str) -> Result:
    image = project.dataset_file(name)
    if not (is_image_name(image) and image.is_file()):
        raise UserError(f"no image {name!r} in {project.dataset}; list the images with: captions {project.name} show")
    path = write_caption(image, text, project=project)
    written = path.read_text(encoding="utf-8")
    return Result({"image": name, "file": str(path), "caption": written}, f"wrote {path.name}: {written}")


def _lint(project: Project, trigger: str) -> Result:
    reads = read_captions(project)
    tokenizer = load_clip_tokenizer()
    counter = clip_token_counter(tokenizer) if tokenizer is not None else None
    report = lint_captions({name: r.text for name, r in reads.items()}, trigger, counter)
    warnings = [r.warning for r in reads.values() if r.warning]
    text = "\n".join([report.text(), *(f"warning: {w}" for w in warnings)])
    return Result({**report.as_dict(), "warnings": warnings}, text, ok=report.ok)


def run(args) -> Result:
    project = open_project(args.root, args.project)
    expected = 2 if args.action == "set" else 0
    if len(args.values) != expected:
        usage = "captions PROJECT set NAME TEXT" if args.action == "set" else f"captions PROJECT {args.action}"
        raise UserError(f"{args.action} takes {expected or 'no'} value(s), got {len(args.values)}; usage: {usage}")
    if args.trigger and args.action != "lint":
        raise UserError("--trigger is only used by lint; run: captions PROJECT lint --trigger T")
    if args.action == "set":
        return _set(project, *args.values)
    if args.action == "lint":
        return _lint(project, args.trigger)
    return _show(project)
