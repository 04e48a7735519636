"""Photo captions with BLIP through ``transformers`` (``BlipForConditionalGeneration``).

One sentence per image, generated in batches. An optional conditional prefix ("a photograph of")
steers the sentence; it is fed to the decoder as its first words and cut from the result, so the
caption holds only what the model added.
"""

from __future__ import annotations

from lorakit_ext.caption.base import fetch_model, load_local, local_folder, parallel_map
from lorakit_ext.errors import UserError

DEFAULT_BLIP_MODEL = "Salesforce/blip-image-captioning-large"
# The Colab notebook's settings: long enough for a full description, short enough for one CLIP chunk.
DEFAULT_MIN_LENGTH = 10
DEFAULT_MAX_LENGTH = 75


def load_blip(source: str):
    """``(processor, model)`` from a folder or a Hugging Face id, fp32 on the CPU."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    def load(local_only: bool):
        processor = BlipProcessor.from_pretrained(source, local_files_only=local_only)
        model = BlipForConditionalGeneration.from_pretrained(source, local_files_only=local_only)
        return processor, model

    folder = local_folder(source)
    if folder is not None:
        return load_local(folder, load, what="BLIP model", needs="config.json, the weights and the processor files")
    return fetch_model(source, load, what="BLIP model", option="--model")


class BlipCaptioner:
    """``min_length``/``max_length`` count the decoder's tokens, its start token and the prefix
    included, as the BLIP authors' own captioning code counts them; ``beams`` 1 is greedy."""

    def __init__(
        self,
        model: str = DEFAULT_BLIP_MODEL,
        *,
        prefix: str = "",
        beams: int = 1,
        min_length: int = DEFAULT_MIN_LENGTH,
        max_length: int = DEFAULT_MAX_LENGTH,
    ):
        if beams < 1:
            raise UserError(f"beams must be 1 (greedy) or more, not {beams}")
        if not 1 <= min_length <= max_length:
            raise UserError(f"need 1 ≤ min length ≤ max length; got {min_length} and {max_length}")
        self.source = str(model)
        self.prefix = " ".join(prefix.split())
        self.beams = beams
        self.min_length = min_length
        self.max_length = max_length
        self.name = f"blip:{self.source}"
        self._model = self._processor = self._device = self._dtype = None
        self._decoded_prefix = ""

    def load(self, device, dtype) -> None:
        processor, model = load_blip(self.source)
        self.attach(model, processor, device, dtype)

    def attach(self, model, processor, device, dtype) -> None:
        """Uses an already built model (the loader above, or the benchmark's random-weight one)."""
        self._model = model.to(device=device, dtype=dtype).eval()
        self._processor, self._device, self._dtype = processor, device, dtype
        if self.prefix:
            # The uncased tokenizer lower-cases and re-spaces the prefix; compare with what it decodes to.
            tokenizer = processor.tokenizer
            self._decoded_prefix = tokenizer.decode(tokenizer(self.prefix, add_special_tokens=False)["input_ids"]).strip()

    def caption(self, images: list) -> list[str]:
        import torch

        if self._model is None:
            raise RuntimeError("BlipCaptioner.caption() called before load()")
        pixels = self._pixels(images)
        kwargs = {}
        if self.prefix:
            tokens = self._processor.tokenizer([self.prefix] * len(images), return_tensors="pt")
            kwargs = {"input_ids": tokens["input_ids"].to(self._device), "attention_mask": tokens["attention_mask"].to(self._device)}
        with torch.inference_mode():
            out = self._model.generate(
                pixel_values=pixels.to(self._device, self._dtype),
                num_beams=self.beams,
                do_sample=False,
                min_length=self.min_length,
                max_length=self.max_length,
                **kwargs,
            )
        return [self._strip_prefix(t) for t in self._processor.batch_decode(out, skip_special_tokens=True)]

    def _pixels(self, images: list):
        """The image processor's pixel values, with its resize (the costly step) done on a few
        threads beforehand, as PIL would do it inside the processor: same size, same filter."""
        from PIL import Image

        processor = self._processor.image_processor
        size = (processor.size["width"], processor.size["height"])
        resample = Image.Resampling(int(processor.resample))
        resized = parallel_map(lambda image: image.convert("RGB").resize(size, resample), images)
        return processor(resized, do_resize=False, return_tensors="pt")["pixel_values"]

    def _strip_prefix(self, text: str) -> str:
        text = text.strip()
        if self._decoded_prefix and text.lower().startswith(self._decoded_prefix.lower()):
            text = text[len(self._decoded_prefix) :].strip()
        return text

    def unload(self) -> None:
        self._model = self._processor = None
