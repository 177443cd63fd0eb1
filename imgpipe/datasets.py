"""The one home of image decoding and resizing in TensorFlow: tf.data input pipelines for
training and evaluation, and the same ``decode_and_resize`` inside the serving signature."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imgpipe.tfrecords import feature_spec


def decode_and_resize(encoded: Any, image_size: int) -> Any:
    """Encoded JPEG/PNG/GIF/BMP bytes -> float32 RGB 0-255, ``image_size`` square.

    Bilinear with antialiasing, so downscaling does not alias; shared by training, evaluation
    and the serving signature so all three see the same pixels.
    """
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
    return resize(image, image_size)


def resize(images: Any, image_size: int) -> Any:
    """uint8 or float RGB 0-255, one image or a batch -> float32 0-255, ``image_size`` square."""
    import tensorflow as tf

    images = tf.image.resize(
        tf.cast(images, tf.float32), (image_size, image_size), method="bilinear", antialias=True
    )
    return tf.clip_by_value(images, 0.0, 255.0)


def parse_example(serialized: Any) -> dict[str, Any]:
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, feature_spec())


def image_dataset(
    files: Sequence[str],
    image_size: int,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    epochs: int = 1,
    first_epoch: int = 0,
    with_ids: bool = False,
    count: int | None = None,
) -> Any:
    """(image, label) batches from TFRecord shards, in file order, or shuffled when a seed is
    given: then epochs ``first_epoch`` to ``epochs - 1`` follow one another (fit with
    ``steps_per_epoch``), each shuffled by a seed of its own derived from ``shuffle_seed`` and
    the epoch number, and no batch spans two epochs. The order depends on nothing else, so a
    resumed run and a run under a tf.distribute strategy see the batches one uninterrupted
    single-device run sees (tf.data's own per-iteration reshuffle does not: a distributed
    dataset draws other orders). ``count``, when known, tells Keras how many examples there
    are (no "ran out of data")."""
    import tensorflow as tf

    records = tf.data.TFRecordDataset(list(files), num_parallel_reads=len(files))
    if count is not None:
        records = records.apply(tf.data.experimental.assert_cardinality(count))

    def to_pair(serialized: Any) -> Any:
        ex = parse_example(serialized)
        image = decode_and_resize(ex["image/encoded"], image_size)
        label = tf.cast(ex["image/class/label"], tf.int32)
        return (image, label, ex["image/sha256"]) if with_ids else (image, label)

    def batches(ds: Any) -> Any:
        return ds.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(
            batch_size
        )

    if shuffle_seed is None:
        ds = batches(records)
    else:
        ds = epoch_batches(
            lambda seed: batches(records.shuffle(4096, seed=seed, reshuffle_each_iteration=False)),
            shuffle_seed,
            epochs,
            first_epoch,
        )
    # Under a multi-worker strategy every worker reads the same batches and keeps its slice of
    # each (DATA): the global batches stay those of one device, whatever the number of shards.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def epoch_batches(shuffled: Any, seed: int, epochs: int, first_epoch: int = 0) -> Any:
    """The batches of epochs ``first_epoch`` .. ``epochs - 1`` in a row, epoch e being
    ``shuffled(seed * 1_000_003 + e)`` (a dataset of batches for that int64 seed tensor)."""
    import tensorflow as tf

    return tf.data.Dataset.range(first_epoch, epochs).flat_map(
        lambda epoch: shuffled(seed * 1_000_003 + epoch)
    )


def encoded_dataset(encoded: Sequence[bytes], image_size: int, batch_size: int) -> Any:
    """Batches of encoded images decoded and resized as in training, in order: how evaluate
    and export's parity report feed a model the test split."""
    import tensorflow as tf

    return (
        tf.data.Dataset.from_tensor_slices(tf.constant(list(encoded)))
        .map(lambda b: decode_and_resize(b, image_size), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
