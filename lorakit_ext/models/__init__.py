"""Diffusion model adapters and model-building helpers."""
