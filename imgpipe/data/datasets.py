"""The one home of image decoding and resizing in TensorFlow: tf.data input pipelines for
training and evaluation, and the same ``decode_and_resize`` inside the serving signature."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from imgpipe.data.tfrecords import feature_spec

if TYPE_CHECKING:
    from imgpipe.core.params import AugmentParams


def decode_and_resize(encoded: Any, image_size: int) -> Any:
    """Encoded JPEG/PNG/GIF/BMP bytes -> float32 RGB 0-255, ``image_size`` square.

    Bilinear with antialiasing, so downscaling does not alias; shared by training, evaluation
    and the serving signature so all three see the same pixels.
    """
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
    return resize(image, image_size)


def header_pixels(encoded: Any) -> Any:
    """The pixels an encoded image's header claims, read without decoding it (int64; 0 for a
    format decode_image does not take, which then refuses it): PNG's IHDR, JPEG's frame header
    (``tf.image.extract_jpeg_shape``), GIF's logical screen, BMP's info header."""
    import tensorflow as tf

    head = tf.io.decode_raw(tf.strings.substr(encoded + tf.constant(bytes(32)), 0, 32), tf.uint8)
    head = tf.cast(tf.reshape(head, [32]), tf.int64)

    def number(start: int, width: int, big_endian: bool) -> Any:
        digits = [head[start + i] for i in range(width)]
        value = tf.constant(0, tf.int64)
        for digit in digits if big_endian else reversed(digits):
            value = value * 256 + digit
        return value

    def starts(magic: bytes) -> Any:
        return tf.reduce_all(tf.equal(head[: len(magic)], tf.constant(list(magic), tf.int64)))

    def bmp() -> Any:  # signed 32-bit, a negative height means top-down rows
        width, height = number(18, 4, False), number(22, 4, False)
        return tf.abs(width - tf.where(width >= 2**31, 2**32, 0)) * tf.abs(
            height - tf.where(height >= 2**31, 2**32, 0)
        )

    def jpeg() -> Any:
        shape = tf.image.extract_jpeg_shape(encoded, output_type=tf.int64)
        return shape[0] * shape[1]

    return tf.case(
        [
            (starts(b"\x89PNG\r\n\x1a\n"), lambda: number(16, 4, True) * number(20, 4, True)),
            (starts(b"\xff\xd8"), jpeg),
            (starts(b"GIF8"), lambda: number(6, 2, False) * number(8, 2, False)),
            (starts(b"BM"), bmp),
        ],
        default=lambda: tf.constant(0, tf.int64),
    )


def resize(images: Any, image_size: int) -> Any:
    """uint8 or float RGB 0-255, one image or a batch -> float32 0-255, ``image_size`` square."""
    import tensorflow as tf

    images = tf.image.resize(
        tf.cast(images, tf.float32), (image_size, image_size), method="bilinear", antialias=True
    )
    return tf.clip_by_value(images, 0.0, 255.0)


SHUFFLE_BUFFER = 4096
"""Records held for shuffling when their number is not given: a memory bound, not a tunable
(image_dataset's callers that shuffle pass ``count``, so the whole epoch is permuted)."""


VIEWS_PER_EPOCH = 1 << 20
"""In a class-balanced epoch, the view key of a class's i-th draw is the epoch's seed times this
plus i: distinct for every draw of an epoch (a class has fewer draws than this) and for every
epoch."""


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
    views: AugmentParams | None = None,
    balanced: int | None = None,
) -> Any:
    """(image, label) batches from TFRecord shards, in file order, or shuffled when a seed is
    given: then epochs ``first_epoch`` to ``epochs - 1`` follow one another (fit with
    ``steps_per_epoch``), each shuffled by a seed of its own derived from ``shuffle_seed`` and
    the epoch number, and no batch spans two epochs. The order depends on nothing else, so a
    resumed run and a run under a tf.distribute strategy see the batches one uninterrupted
    single-device run sees (tf.data's own per-iteration reshuffle does not: a distributed
    dataset draws other orders). ``count``, when known, tells Keras how many examples there
    are (no "ran out of data"). With ``views`` (and a seed), every epoch sees a fresh random
    view of each image (imgpipe.data.augmentation), drawn from the epoch's seed and the image's
    sha256: reproducible, and the same for one device, replicas or a resumed run.

    ``balanced`` (the number of classes; with a seed and ``count``): each epoch is instead a
    class-balanced draw of ``count`` images. Every draw picks a class, each as likely as the
    others, then that class's next image in an order seeded by the epoch, starting the class
    over in a new order when it runs out: a rare class's images recur within an epoch, a common
    class's are not all seen, and with ``views`` each draw is a view of its own (the epoch's
    seed, the draw's number within its class and the image's sha256)."""
    import tensorflow as tf

    from imgpipe.data.augmentation import tf_random_view

    records = tf.data.TFRecordDataset(list(files), num_parallel_reads=len(files))
    if count is not None:
        records = records.apply(tf.data.experimental.assert_cardinality(count))

    def to_pair(serialized: Any, view_key: Any = None) -> Any:
        ex = parse_example(serialized)
        if view_key is None or views is None or shuffle_seed is None:
            image = decode_and_resize(ex["image/encoded"], image_size)
        else:
            drawn = tf_random_view(
                ex["image/encoded"], ex["image/sha256"], shuffle_seed, view_key, views
            )
            image = resize(drawn, image_size)
        label = tf.cast(ex["image/class/label"], tf.int32)
        return (image, label, ex["image/sha256"]) if with_ids else (image, label)

    def batches(ds: Any, view_key: Any = None, numbered: bool = False) -> Any:
        """``ds``'s records as batched pairs, views drawn with ``view_key`` (the epoch's seed);
        ``numbered``: ``ds`` holds (number, record), each draw its own view key (``balanced``)."""

        def pair(*element: Any) -> Any:
            if not numbered:
                return to_pair(element[0], view_key)
            number, serialized = element
            return to_pair(serialized, view_key * VIEWS_PER_EPOCH + number)

        return ds.map(pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(
            batch_size
        )

    def balanced_draw(seed: Any, classes: int, count: int) -> Any:
        """One epoch of ``count`` draws over ``classes`` classes, batched (``balanced``)."""

        def of_class(k: int) -> Any:
            return (
                records.filter(lambda s: tf.equal(parse_example(s)["image/class/label"], k))
                .shuffle(count, seed=seed + k, reshuffle_each_iteration=True)
                .repeat()
                .enumerate()
            )

        drawn = tf.data.Dataset.sample_from_datasets(
            [of_class(k) for k in range(classes)], seed=seed, stop_on_empty_dataset=False
        ).take(count)
        return batches(drawn, seed, numbered=True)

    if shuffle_seed is None:
        if balanced is not None:
            raise ValueError("a class-balanced draw needs a shuffle seed")
        ds = batches(records)
    elif balanced is not None:
        if count is None:
            raise ValueError("a class-balanced draw needs the number of records")
        classes, total = balanced, count
        ds = epoch_batches(
            lambda seed: balanced_draw(seed, classes, total), shuffle_seed, epochs, first_epoch
        )
    else:
        # A buffer as large as the data, so every epoch is a full, seeded permutation.
        buffer = count if count is not None else SHUFFLE_BUFFER
        ds = epoch_batches(
            lambda seed: batches(
                records.shuffle(buffer, seed=seed, reshuffle_each_iteration=False), seed
            ),
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
    ``shuffled(seed * 1_000_003 + e)`` (a dataset of batches for that int64 seed tensor).

    Each epoch's dataset is made here, eagerly, then they are chained: made inside a traced
    ``flat_map``, a shuffle seeded by a tensor cannot be built under a global seed of 0
    (``keras.utils.set_random_seed(0)``: ``train.seed`` or ``finetune.seed`` 0), where
    TensorFlow compares the op seed with 0 as a Python bool."""
    import functools

    import tensorflow as tf

    def epoch(e: int) -> Any:
        return shuffled(tf.constant(seed * 1_000_003 + e, tf.int64))

    if first_epoch >= epochs:
        return epoch(first_epoch).take(0)
    return functools.reduce(
        lambda chained, following: chained.concatenate(following),
        (epoch(e) for e in range(first_epoch, epochs)),
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
