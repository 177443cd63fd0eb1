"""The pipeline's stages, one module each and nothing else: ``ingest``, ``validate``,
``augment``, ``train``, ``finetune``, ``evaluate``, ``export``, ``push``.

Each is a plain keyword-only ``run(<inputs>, <outputs>, <params sections>)`` over paths and the
typed views of ``params.yaml``, declared in ``pipelines/stages.py``; it knows neither DVC nor
Kubeflow. What the stages share lives in ``imgpipe/``."""
