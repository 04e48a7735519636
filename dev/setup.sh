#!/usr/bin/env bash
# Creates ./.venv with everything LoRA Kit, its demo and its tests need, outside A1111.
# Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" -c dev/constraints.txt -e ".[test]"
# ldm (the Stable Diffusion classes A1111 runs) ships on PyPI inside stable-diffusion-sdkit, whose
# declared pins conflict with everything; the ldm code itself needs only what is installed above.
"${pip[@]}" --no-deps stable-diffusion-sdkit==2.1.5
