"""The people's report of ``bench train``: one table line per row, ours and kohya's side by side,
then the notes and what each column measures."""

from __future__ import annotations

from collections.abc import Callable


def _gib(key: str) -> Callable[[dict], str]:
    return lambda row: f"{row[key]:.2f}" if key in row else "-"


def _seconds(key: str) -> Callable[[dict], str]:
    return lambda row: f"{row[key]:.1f}s" if key in row else "-"


def _it_s(row: dict) -> str:
    return "OOM" if row["out_of_memory"] else f"{row['it_per_s']:.2f}"


def _kohya_it_s(row: dict) -> str:
    if "kohya_it_per_s" not in row:
        return "-"
    return f"{row['kohya_it_per_s']:.2f}" + ("" if row["kohya_same_run"] else "*")


def _yes(key: str) -> Callable[[dict], str]:
    return lambda row: "on" if row[key] else "off"


# (header, width and alignment, cell)
COLUMNS: tuple[tuple[str, str, Callable[[dict], str]], ...] = (
    ("weights", "<7", lambda r: r["weights"]),
    ("mode", "<6", lambda r: r["mode"]),
    ("chlast", "<6", lambda r: r["channels_last"]),
    ("compiled", "<8", _yes("compiled_blocks")),
    ("train", "<9", lambda r: r["train"]),
    ("TE cache", "<8", _yes("text_encoder_outputs_cached")),
    ("gc", "<3", _yes("gradient_checkpointing")),
    ("batch", ">5", lambda r: str(r["batch"])),
    ("GPUs", ">4", lambda r: str(r.get("processes", 1))),
    ("prec", "<4", lambda r: r["precision"]),
    ("it/s", ">7", _it_s),
    ("img/s", ">7", lambda r: f"{r['images_per_s']:.1f}" if "images_per_s" in r else "-"),
    ("scaling", ">7", lambda r: f"{r['scaling']:.2f}x" if "scaling" in r else "-"),
    ("first step", ">10", _seconds("start_to_first_step_s")),
    ("allocated", ">9", _gib("peak_allocated_gib")),
    ("reserved", ">8", _gib("peak_reserved_gib")),
    ("smi peak", ">8", _gib("smi_peak_gib")),
    ("kohya it/s", ">10", _kohya_it_s),
    ("ratio", ">6", lambda r: f"{r['ratio_vs_kohya']:.2f}x" if "ratio_vs_kohya" in r else "-"),
    ("kohya 1st", ">9", _seconds("kohya_first_step_s")),
    ("kohya rsvd", ">10", _gib("kohya_peak_reserved_gib")),
    ("kohya smi", ">9", _gib("kohya_smi_peak_gib")),
)


def _line(cells: list[str]) -> str:
    return " ".join(f"{cell:{layout}}" for cell, (_, layout, _) in zip(cells, COLUMNS))


def row_settings(row: dict) -> tuple:
    """What makes two rows the same measurement apart from the mode (graphs/eager) and the process count."""
    return (row["weights"], row["train"], row["batch"], row["gradient_checkpointing"], row["channels_last"],
            row.get("compiled_blocks", False))


def _row_label(row: dict) -> str:
    compiled = " compiled" if row.get("compiled_blocks") else ""
    return f"{row['weights']} {row['mode']} {row['train']} b{row['batch']}{' gc' if row['gradient_checkpointing'] else ''}{compiled}"


def report(figures: dict, args) -> str:
    f = figures
    budget = f" (memory budget {f['memory_budget_gib']:g} GiB)" if f["memory_budget_gib"] is not None else ""
    lines = [f"{f['model']} on {f['device']}{budget}, {f['resolution']}², {f['images']} images, LoRA dim {args.dim}/alpha {args.alpha}"]
    lines.append(_line([header for header, _, _ in COLUMNS]))
    lines += [_line([cell(r) for _, _, cell in COLUMNS]) for r in f["rows"]]
    for r in f["rows"]:
        lines += [f"note ({_row_label(r)}): {n}" for n in r["notes"]]
    lines += [f"note: {n}" for n in f["kohya_notes"]]
    for r in f["rows"]:
        if r.get("kernels"):
            k = r["kernels"]
            kinds = ", ".join(f"{kind} {ms:.1f} ms ({100 * ms / k['step_ms']:.0f} %)" for kind, ms in k["kinds_ms"].items())
            lines.append(f"kernels ({_row_label(r)}): {k['step_ms']:.1f} ms per eager step, a captured step's floor "
                         f"{k['floor_it_s']:.2f} it/s: {kinds}")
    graphs = {row_settings(r): r.get("it_per_s") for r in f["rows"] if r["mode"] == "graphs"}
    for r in f["rows"]:
        key = row_settings(r)
        if r["mode"] == "eager" and graphs.get(key) and "it_per_s" in r:
            lines.append(f"graphs vs eager, same run ({_row_label(r)}): {graphs[key] / r['it_per_s']:.2f}x")
    for r in f["rows"]:
        if r.get("compiled_blocks") and r.get("graph_warmup_s"):
            firsts = ", ".join(f"{s[0]:.1f} s" for s in r["graph_warmup_s"] if s)
            lines.append(f"compiled ({_row_label(r)}): each captured shape's first warm-up step (compiling included): {firsts}")
    lines.append("first step: seconds from Trainer.run() to the first optimizer step, model already in memory (latent and "
                 "text-encoder caching included); kohya 1st: from the start of kohya's process (imports and model load included).")
    if any("scaling" in r for r in f["rows"]):
        lines.append("GPUs: data-parallel processes, one GPU each, batch per GPU; img/s counts every GPU; scaling: img/s over the "
                     "same row's in the fewest GPUs of this run.")
    lines.append("TE cache: UNet-only rows on text-encoder outputs encoded once (encoders off the GPU); gc: gradient checkpointing; "
                 "chlast: UNet weights and latents in channels_last (auto: on CUDA); compiled: each UNet block compiled with "
                 "torch.compile (Inductor).")
    lines.append("allocated/reserved: torch's peak allocated/reserved memory, GiB; smi peak: nvidia-smi memory.used peak, GiB "
                 "(CUDA context included); kohya rsvd/smi: the same for kohya's process.")
    if f["memory_budget_gib"] is not None:
        lines.append(f"memory budget: torch's allocator in this process was capped at {f['memory_budget_gib']:g} GiB (the CUDA "
                     "context comes on top, see smi peak); OOM: the row ran out of it. kohya's rows ran uncapped.")
    if any(r.get("kohya_same_run") is False for r in f["rows"]):
        lines.append("kohya it/s*: kohya sd-scripts 48d368f as recorded on one H200, not this run (--kohya-sd-scripts runs it here).")
    return "\n".join(lines)
