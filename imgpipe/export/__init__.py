"""What leaves training as a servable artifact: the SavedModel and its signatures
(``savedmodel``), the float and int8 TFLite models with their parity report (``tflite``) and the
model card (``model_card``).

May import ``core``, ``data``, ``model`` and ``evaluation``, and the warmup records' format
of ``serving.warmup``.
"""
