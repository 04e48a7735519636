"""``caption PROJECT --captioner blip|wd|both [--mode missing|overwrite|prepend|append] …``."""

from __future__ import annotations


# None of these import torch, timm or transformers: building the parser stays fast.
from lorakit_ext.caption.base import DTYPES
from lorakit_ext.caption.blip import DEFAULT_BLIP_MODEL, DEFAULT_MAX_LENGTH, DEFAULT_MIN_LENGTH, BlipCaptioner
from lorakit_ext.caption.merge import MergedCaptioner
from lorakit_ext.caption.runner import MODES, caption_project
from lorakit_ext.caption.wd import DEFAULT_CHARACTER_THRESHOLD, DEFAULT_GENERAL_THRESHOLD, DEFAULT_WD_MODEL, WdTagger
from lorakit_ext.cli.output import Result
from lorakit_ext.cli.progress import ProgressPrinter, first_ctrl_c_stops
from lorakit_ext.errors import UserError
from lorakit_ext.project import open_project
from lorakit_ext.train.events import Interrupted

CAPTIONERS = ("blip", "wd", "both")


def register(sub, common) -> None:
    p = sub.add_parser(
        "caption",
        parents=[common],
        help="caption a project's images with BLIP (photos) or a WD tagger (anime tags)",
        description="Writes a caption file for each image. missing (default): only images without a "
        "caption; overwrite: replace captions; prepend/append: add the new tags a caption lacks. "
        "Ctrl-C stops after the current batch; running the same command again continues.",
    )
    p.add_argument("project", help="an existing project")
    p.add_argument("--captioner", required=True, choices=CAPTIONERS, help="blip: a sentence; wd: tags; both: the sentence, then the tags")
    p.add_argument("--mode", default="missing", choices=MODES, help="which captions to write (default: missing)")
    p.add_argument("--model", default=None, metavar="ID_OR_PATH", help=f"BLIP model: Hugging Face id or folder (default {DEFAULT_BLIP_MODEL})")
    p.add_argument("--wd-model", default=None, metavar="ID_OR_PATH", help=f"WD v3 tagger: Hugging Face id or folder (default {DEFAULT_WD_MODEL})")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8; halved once when the GPU runs out of memory)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="precision (default: fp16 on a GPU, fp32 on the CPU)")
    wd = p.add_argument_group("WD tagger")
    wd.add_argument("--threshold", type=float, default=DEFAULT_GENERAL_THRESHOLD, help=f"confidence above which a general tag is kept (default {DEFAULT_GENERAL_THRESHOLD})")
    wd.add_argument("--character-threshold", type=float, default=DEFAULT_CHARACTER_THRESHOLD, help=f"the same for character tags (default {DEFAULT_CHARACTER_THRESHOLD})")
    wd.add_argument("--blacklist", default="", metavar="T,...", help="tags never to write")
    wd.add_argument("--ratings", action="store_true", help="also write the most likely rating tag (general, sensitive, …)")
    blip = p.add_argument_group("BLIP")
    blip.add_argument("--prefix", default="", metavar="TEXT", help='start every sentence with this, e.g. "a photograph of" (not written)')
    blip.add_argument("--beams", type=int, default=1, help="beam search width (default 1: greedy)")
    blip.add_argument("--min-length", type=int, default=DEFAULT_MIN_LENGTH, help=f"minimum caption length in tokens, the prefix included (default {DEFAULT_MIN_LENGTH})")
    blip.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help=f"maximum caption length in tokens, the prefix included (default {DEFAULT_MAX_LENGTH})")
    p.set_defaults(handler=run)


def build_captioner(args):
    if args.model and args.captioner == "wd":
        raise UserError("--model names the BLIP model; give the tagger with --wd-model")
    if args.wd_model and args.captioner == "blip":
        raise UserError("--wd-model names the WD tagger; give the BLIP model with --model")
    parts = []
    if args.captioner in ("blip", "both"):
        parts.append(
            BlipCaptioner(
                args.model or DEFAULT_BLIP_MODEL,
                prefix=args.prefix,
                beams=args.beams,
                min_length=args.min_length,
                max_length=args.max_length,
            )
        )
    if args.captioner in ("wd", "both"):
        parts.append(
            WdTagger(
                args.wd_model or DEFAULT_WD_MODEL,
                general_threshold=args.threshold,
                character_threshold=args.character_threshold,
                blacklist=args.blacklist.split(","),
                include_ratings=args.ratings,
            )
        )
    return parts[0] if len(parts) == 1 else MergedCaptioner(*parts)


def run(args) -> Result:
    project = open_project(args.root, args.project)
    captioner = build_captioner(args)
    try:
        with first_ctrl_c_stops("stopping after this batch (Ctrl-C again to abort at once)…") as should_stop:
            report = caption_project(
                project,
                captioner,
                mode=args.mode,
                batch_size=args.batch_size,
                on_progress=ProgressPrinter(),
                should_stop=should_stop,
                device=args.device,
                dtype=args.dtype,
            )
    except Interrupted as exc:
        return Result({"status": "interrupted", "message": str(exc)}, f"interrupted: {exc}", ok=False)
    return Result({"status": "done", **report.as_dict()}, report.text())
