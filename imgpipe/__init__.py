"""The library the stages share, one home per idea: params, images, labels, the manifest and
shard layout, tf.data, backbones, training helpers, metrics, the SavedModel contract, the MLflow
registry and runs, figures, atomic file writes. It imports no stage (``components``) and no
orchestrator (``pipelines``)."""
