"""Comparing epochs: sample images with each epoch's LoRA and lay them out as a grid."""
