"""Which autocast dtype and loss scaling a run uses, from the device, the base weights and the
``mixed_precision`` option."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit_ext.errors import UserError


@dataclass(frozen=True)
class Precision:
    autocast: torch.dtype | None  # None: run in the weights' own dtype (fp32 on CPU)
    scaler: bool  # fp16 gradients need loss scaling

    @property
    def name(self) -> str:
        return {None: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.autocast]


def resolve_precision(option: str, device: torch.device, weight_dtype: torch.dtype) -> Precision:
    if device.type != "cuda":
        if weight_dtype != torch.float32:
            raise UserError(
                f"the model's weights are {str(weight_dtype).removeprefix('torch.')} on {device.type}; "
                "training on the CPU needs fp32 weights (start the WebUI with --no-half --precision full)"
            )
        return Precision(None, False)
    bf16_ok = torch.cuda.is_bf16_supported()
    if option == "bf16" and not bf16_ok:
        raise UserError("this GPU does not support bf16; choose fp16 or auto")
    if option == "no":
        if weight_dtype != torch.float32:
            # Half weights cannot run without autocast; the closest honest choice is their own dtype.
            return Precision(weight_dtype, weight_dtype == torch.float16)
        return Precision(None, False)
    if option == "auto":
        # fp16 weights (A1111's default) compute fastest in fp16; otherwise bf16 needs no scaler.
        option = "fp16" if weight_dtype == torch.float16 or not bf16_ok else "bf16"
    dtype = torch.float16 if option == "fp16" else torch.bfloat16
    return Precision(dtype, dtype == torch.float16)
