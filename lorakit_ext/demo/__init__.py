"""The built-in demo: a synthetic character dataset and the whole pipeline run over it."""
