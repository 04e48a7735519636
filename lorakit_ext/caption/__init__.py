"""Automatic captions for a project's dataset: BLIP sentences, WD tagger tags, or both.

``base`` holds the interface every captioner implements (A1111's own interrogators too, in
``lorakit_ext.webui.captioners``); ``runner`` walks the dataset in batches and writes the captions.
Nothing here imports torch or transformers at package import, so the CLI starts quickly.
"""
