"""Writing, reading and merging kohya-format LoRA files (the format A1111, Forge, ComfyUI and diffusers load)."""
