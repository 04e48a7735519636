"""``--a1111-dir``, the option of every command that builds a model headless."""

from __future__ import annotations


def add_a1111_dir(parser) -> None:
    parser.add_argument("--a1111-dir", metavar="DIR",
                        help="an A1111 install (stable-diffusion-webui folder) whose copies of the model code LoRA Kit may use: "
                             "ldm (SD1/SD2) and sgm (SDXL); or set LORAKIT_LDM_DIR / LORAKIT_SGM_DIR")
