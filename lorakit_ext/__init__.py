"""LoRA Kit: dataset → captions → LoRA training → epoch comparison, in A1111 or headless.

The core of this package never imports A1111's ``modules``; only ``lorakit_ext.webui`` does.
"""

__version__ = "0.1.0"
