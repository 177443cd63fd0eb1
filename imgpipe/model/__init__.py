"""The network and how it is trained: the backbone registry (``backbones``) with the offline
EfficientNet-Lite built in Keras (``efficientnet_lite``, from a PyTorch pickle read without
torch: ``torch_pickle``), the head and its training helpers (``training``), the ordinal head
(``ordinal``), quantization-aware training (``quantization``), resumable fine-tuning
(``checkpoints``), tf.distribute strategies and the multi-worker epoch loop (``distribute``,
with ``trainjob``: TF_CONFIG from a Kubeflow Trainer pod), Grad-CAM (``saliency``),
models averaged in one (``ensemble``) and what a student distilled from them learns
(``distill``).

May import ``core`` and ``data``.
"""
