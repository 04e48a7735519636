"""The dataset half: image import, near-duplicate curation, caption sidecars, tag curation."""
