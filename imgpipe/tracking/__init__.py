"""MLflow as the pipeline uses it: stage runs, their params, datasets and tags (``runs``), the
model registry's champion and challenger aliases (``registry``) and who may do what, with the
error a refused call becomes (``access``).

May import ``core`` and ``data`` (what a registered model trained on).
"""
