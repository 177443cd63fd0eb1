"""The labelled images and everything derived from them before a model sees them: decoding and
checks (``images``), class names (``labels``), ingest's output layout and its one reader
(``manifest``), the train/val/test splits and folds that stay put as data grows (``splits``),
TFRecord shards (``tfrecords``), tf.data and the decoding the serving graph reuses
(``datasets``), the random training views (``augmentation``), the input expectations
(``expectations``), the offline sample data (``sample_data``, ``fashion_mnist_data``), what a
model trained on (``lineage``) and labelled feedback written into the data (``feedback``).

May import ``core``.
"""
