"""Importing the trainer for a headless run, in a process LoRA Kit owns.

peft (and transformers with it) imports bitsandbytes wherever it is installed, for quantised base
layers, which LoRA Kit never trains: 1.7–1.8 s of the start on the H100 machine, paid either when
peft is imported (recent peft) or when the network is injected (peft 0.13). A run needs
bitsandbytes only for an eager AdamW8bit, whose optimiser imports it itself. So while the training
stack is imported, bitsandbytes looks absent to it, and peft's cached answer stays "absent" for the
rest of the process. Inside A1111 this never happens: other extensions share peft with LoRA Kit.
"""

from __future__ import annotations

import contextlib
import sys
import time

BITSANDBYTES = "bitsandbytes"


@contextlib.contextmanager
def _unseen(package: str):
    """``package`` looks uninstalled inside the block: a None entry in ``sys.modules`` is what
    ``importlib.util.find_spec`` (peft's and transformers' test) answers None for, and what makes
    ``import package`` fail as if it were missing. Nothing changes once it has been imported."""
    if package in sys.modules:
        yield
        return
    sys.modules[package] = None
    try:
        yield
    finally:
        if package in sys.modules and sys.modules[package] is None:
            del sys.modules[package]


def _settle_peft_answers() -> None:
    """Asks peft, while bitsandbytes looks absent, the questions it caches (peft 0.13 would ask them
    first when the network is injected)."""
    import peft.import_utils

    for name in ("is_bnb_available", "is_bnb_4bit_available"):
        asked = getattr(peft.import_utils, name, None)
        if asked is not None:
            asked()


def import_training_stack(family) -> float:
    """Imports the trainer (transformers and peft with it: seconds on a large environment) and the
    checkpoint's ``family``'s model code (where known); returns the seconds, which the run record
    counts as imports rather than as the checks or the model build that would otherwise pay them."""
    started = time.perf_counter()
    with _unseen(BITSANDBYTES):
        import lorakit_ext.train.loop  # noqa: F401
        import lorakit_ext.train.preflight  # noqa: F401

        _settle_peft_answers()
        if family is not None:
            family.import_code()
    return time.perf_counter() - started
