"""tf.data input: the preprocess output's shards -> batches of (uint8 images, label ids).

Train order, per epoch (reasons in the comments of `train_dataset`):

    shards --uniform_schedule--> records (choose_from_datasets)  # every example once
      -> shuffle (buffer sized in bytes)                         # local mixing
      -> batch -> [skip consumed batches: a mid-epoch resume]    # still serialized
      -> map(parse_example + decode, AUTOTUNE)
      -> [map(augment, seeded by batch number), train only]       # trainer/augment.py
      -> prefetch(AUTOTUNE)                                       # last

One replica: each epoch is shuffled and batched on its own (the last batch short), so any
batch of any epoch can be reproduced alone. Several replicas: one stream across epoch
ends, batches of a fixed shape (`train_dataset` says why).

Uniform over examples. A plain interleave over files takes from each open file in
turn, so with shards of 1000/2000/3000 records the small one is drawn as often as the
big one (1:1:1) until it runs dry, and the end of every epoch is all big-shard
records. Instead each epoch draws its sequence of shard ids with P(next = i) =
remaining_i / remaining (n_i from the manifest; drawn in blocks, see
`uniform_schedule`): what sampling without replacement gives in expectation, so any
prefix of the epoch holds shards 1:2:3 in expectation, and each record comes exactly
once per epoch. The draw is a `scan` with O(shards) state seeded by (seed, epoch),
so a resumed run replays the same epochs. Each shard is read front to back (the
pipeline already dealt its records in a salted-hash order) and the schedule is a
fresh random visiting order of the shards every epoch, so no separate shuffle of the
shard list is needed. The price: every train shard of this worker is open at once,
each with a read buffer of `READ_BUFFER_BYTES / shards` (64 KiB to 8 MiB).

Records carry a list of labels (`image/class/label`); single-label training uses
the first, a manifest label id.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from pipelines.contract import records
from pipelines.contract.imaging import DEFAULT_JPEG_QUALITY
from pipelines.contract.manifest import Manifest

AUTOTUNE = tf.data.AUTOTUNE
SCHEDULE_BLOCK = 128  # shard draws per step of the schedule
READ_BUFFER_BYTES = 64 * 2**20  # shared by all open shards of a worker
_MIN_READ_BUFFER, _MAX_READ_BUFFER = 64 * 2**10, 8 * 2**20
_PARSE_SPEC = {key: records.FEATURE_SPEC[key] for key in (records.ENCODED, records.LABEL)}


@dataclasses.dataclass(frozen=True)
class Shard:
    path: str  # absolute (root joined)
    num_examples: int
    num_bytes: int


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the trainer needs from manifest.json."""

    root: str
    height: int
    width: int
    image_format: str  # jpeg | png | raw
    resize: str  # squash | crop | pad
    max_pixels: int
    labels: tuple[str, ...]  # index = label id
    splits: dict[str, tuple[Shard, ...]]
    transform_output: str | None  # absolute, or None when the manifest names none
    jpeg_quality: int = DEFAULT_JPEG_QUALITY  # stored JPEGs'; serving repeats the encoding

    @classmethod
    def from_manifest(cls, root: str, manifest: Manifest) -> DataSpec:
        def join(relative: str) -> str:
            return f"{root.rstrip('/')}/{relative}"

        image = manifest.image
        transform = manifest.transform_output
        return cls(
            root=root,
            height=image.height,
            width=image.width,
            image_format=image.format,
            resize=image.resize,
            max_pixels=int(manifest.config.get("image", {}).get("max_pixels", 100_000_000)),
            jpeg_quality=int(manifest.config.get("image", {}).get("jpeg_quality",
                                                                   DEFAULT_JPEG_QUALITY)),
            labels=manifest.labels,
            splits={
                name: tuple(Shard(join(s.path), s.num_examples, s.num_bytes)
                            for s in entry.shards if s.num_examples > 0)
                for name, entry in manifest.splits.items()
            },
            transform_output=join(transform) if transform else None,
        )

    def num_examples(self, split: str) -> int:
        return sum(s.num_examples for s in self.splits.get(split, ()))

    def record_bytes(self, split: str) -> float:
        """Mean serialized record size of `split` (for byte-sized buffers)."""
        shards = self.splits.get(split, ())
        return sum(s.num_bytes for s in shards) / max(1, sum(s.num_examples for s in shards))


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Batches in one pass over `num_examples` (the last partial batch counted)."""
    return max(1, math.ceil(num_examples / global_batch_size))


def _epoch_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])


def uniform_schedule(counts: list[int], seed: tf.Tensor) -> tf.data.Dataset:
    """Shard ids for one epoch: shard i drawn in proportion to its records left.

    Draws come in blocks of SCHEDULE_BLOCK (per-element draws cost ~30 us of CPU each,
    a fifth of decoding a 224 px JPEG): each block is drawn with P(i) = remaining_i /
    remaining, then `remaining` drops by what was drawn. The expected share of shard i
    in every block is exactly that of drawing without replacement, so every prefix of
    the epoch is uniform over records in expectation. A draw beyond a shard's last
    record (only near the end of an epoch) is a phantom that `choose_from_datasets`
    skips; the schedule ends when every record is drawn.

    Args:
      counts: records per shard.
      seed: int64 [2], stateless seed (e.g. (run seed, epoch)).
    Returns:
      int64 scalars: every shard i at least counts[i] times, fewer than
      SCHEDULE_BLOCK * len(counts) phantoms in all.
    """
    num_shards = len(counts)

    def draw(remaining, block):
        logits = tf.math.log(tf.cast(remaining, tf.float32))[tf.newaxis]  # log(0) = -inf
        block_seed = tf.random.experimental.stateless_fold_in(seed, block)
        picks = tf.random.stateless_categorical(logits, SCHEDULE_BLOCK, block_seed,
                                                dtype=tf.int64)[0]
        picks = picks[: tf.minimum(tf.reduce_sum(remaining), SCHEDULE_BLOCK)]
        drawn = tf.math.bincount(picks, minlength=num_shards, maxlength=num_shards,
                                 dtype=tf.int64)
        return tf.maximum(remaining - drawn, 0), picks

    return (tf.data.Dataset.counter()
            .scan(tf.constant(counts, tf.int64), draw)
            .take_while(lambda picks: tf.size(picks) > 0)
            .unbatch())


def epoch_records(shards: tuple[Shard, ...], seed: tf.Tensor) -> tf.data.Dataset:
    """Serialized records of one epoch, each once, in `uniform_schedule` order."""
    buffer = int(np.clip(READ_BUFFER_BYTES // len(shards), _MIN_READ_BUFFER, _MAX_READ_BUFFER))
    readers = [tf.data.TFRecordDataset(s.path, buffer_size=buffer) for s in shards]
    schedule = uniform_schedule([s.num_examples for s in shards], seed)
    # Skips draws of an exhausted shard: the schedule's phantoms, or a shard shorter
    # than the manifest says.
    return tf.data.Dataset.choose_from_datasets(readers, schedule, stop_on_empty_dataset=False)


def decode_stored(encoded: tf.Tensor, image_format: str, height: int, width: int) -> tf.Tensor:
    """Stored image bytes (string [B]) -> uint8 [B, height, width, 3]."""
    if image_format == "raw":
        pixels = tf.io.decode_raw(encoded, tf.uint8)
        return tf.reshape(pixels, [-1, height, width, 3])

    def decode_one(data):
        if image_format == "jpeg":
            # ISLOW, as PIL and the serving graph decode: stored and served pixels agree.
            image = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
        else:
            image = tf.io.decode_png(data, channels=3)
        return tf.ensure_shape(image, [height, width, 3])

    return tf.map_fn(decode_one, encoded, parallel_iterations=16,
                     fn_output_signature=tf.TensorSpec([height, width, 3], tf.uint8))


def parse_batch(serialized: tf.Tensor, spec: DataSpec) -> tuple[tf.Tensor, tf.Tensor]:
    """Serialized Examples (string [B]) -> (uint8 [B, H, W, 3], int64 [B] first label id)."""
    parsed = tf.io.parse_example(serialized, _PARSE_SPEC)
    labels = tf.sparse.to_dense(parsed[records.LABEL], default_value=-1)
    first_label = tf.pad(labels, [[0, 0], [0, 1]], constant_values=-1)[:, 0]
    images = decode_stored(parsed[records.ENCODED], spec.image_format, spec.height, spec.width)
    return images, first_label


def _options(deterministic: bool, shard_by_data: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA if shard_by_data
        else tf.data.experimental.AutoShardPolicy.OFF)
    return options


def worker_shards(shards: tuple[Shard, ...], worker_index: int, num_workers: int
                  ) -> tuple[tuple[Shard, ...], bool]:
    """This worker's shards, and whether the worker must take every num_workers-th
    record of all of them instead (fewer shards than workers)."""
    if num_workers <= 1:
        return shards, False
    if len(shards) < num_workers:
        return shards, True
    return shards[worker_index::num_workers], False


def worker_epoch_records(spec: DataSpec, split: str, seed: int, epoch: tf.Tensor | int,
                         worker_index: int = 0, num_workers: int = 1) -> tf.data.Dataset:
    """This worker's serialized records of one epoch, each once, uniform over its examples:
    its own shards, or with fewer shards than workers every num_workers-th record of all
    (the same seeded order on every worker, so the workers' records are disjoint and
    together the whole split)."""
    shards, by_record = worker_shards(spec.splits[split], worker_index, num_workers)
    if not shards:
        raise ValueError(f"split {split!r} has no examples")
    records_ = epoch_records(shards, _epoch_seed(seed, epoch))
    return records_.shard(num_workers, worker_index) if by_record else records_


def worker_examples(spec: DataSpec, split: str, worker_index: int, num_workers: int) -> int:
    """How many records `worker_epoch_records` gives this worker per epoch."""
    shards, by_record = worker_shards(spec.splits[split], worker_index, num_workers)
    total = sum(s.num_examples for s in shards)
    return len(range(worker_index, total, num_workers)) if by_record else total


def train_dataset(
    spec: DataSpec,
    batch_size: int,
    *,
    seed: int = 0,
    start_epoch: int = 0,
    shuffle_buffer_bytes: int = 64 * 10**6,
    cache: str = "none",
    worker_index: int = 0,
    num_workers: int = 1,
    deterministic: bool = False,
    split: str = "train",
    epoch_aligned: bool = False,
    epochs: int | None = None,
    skip_batches: int = 0,
    augment: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple] | None = None,
) -> tf.data.Dataset:
    """Endless train batches from epoch `start_epoch` on: (uint8 [B, H, W, 3], int64 [B]).

    Fit with `steps_per_epoch(spec.num_examples(split), batch_size)`. Memory is bounded
    by the shuffle buffer (bytes), the read buffers and a few batches in flight, never
    by the number of examples (unless `cache` is "memory").

    epoch_aligned: `epochs` epochs (then the batches end), each its own batches (shuffled
      within the epoch, seeded by (seed, epoch); the last batch of an epoch is short), so
      epoch e's batch k is the same whatever epoch the run started in, and `skip_batches`
      (only with this, without `cache`) drops the first batches of `start_epoch` before
      they are decoded: a run resumed mid-epoch sees exactly the remaining records of
      that epoch, in the same order. Without it batches run across epoch ends with a
      fixed shape (what several replicas need: equal shares, one XLA compilation).
    augment: (images, labels, global batch number int64) -> (images, labels), mapped
      over decoded batches; the number counts from epoch 0, batch 0 of the run.
    """
    examples = worker_examples(spec, split, worker_index, num_workers)
    if not examples:
        raise ValueError(f"split {split!r} has no examples")

    def parse(serialized):
        return parse_batch(serialized, spec)

    def one_epoch(epoch):
        return worker_epoch_records(spec, split, seed, epoch, worker_index, num_workers)

    if skip_batches and (cache != "none" or not epoch_aligned):
        raise ValueError("skip_batches needs epoch_aligned batches without a cache")
    steps = steps_per_epoch(examples, batch_size)
    # The buffer holds serialized records (~ the stored JPEG), sized in bytes so a
    # switch to 512 px images does not quietly multiply its memory; at most an epoch.
    buffer = max(1, min(examples, int(shuffle_buffer_bytes / spec.record_bytes(split))))
    if cache == "none" and epoch_aligned:
        if not epochs:
            raise ValueError("epoch_aligned batches need a number of epochs")
        # One pipeline per epoch, concatenated: tf.data's shuffle takes a tensor seed
        # inside a flat_map, but not once a global seed of 0 is set (Keras'
        # set_random_seed(0)): Python ints work with every seed.
        batches = (functools.reduce(tf.data.Dataset.concatenate, [
            one_epoch(epoch).shuffle(buffer, seed=seed * 1_000_003 + epoch).batch(batch_size)
            for epoch in range(start_epoch, start_epoch + epochs)])
                   .skip(skip_batches)  # still serialized: skipped batches are never decoded
                   # Known length: Keras ends the epoch with the data, no "ran out" warning.
                   .apply(tf.data.experimental.assert_cardinality(steps * epochs - skip_batches))
                   .map(parse, num_parallel_calls=AUTOTUNE, deterministic=deterministic))
    elif cache == "none":
        records_ = tf.data.Dataset.counter(start_epoch).flat_map(one_epoch)
        batches = (
            records_.shuffle(buffer, seed=seed * 1_000_003 + start_epoch)
            # Fixed batch shapes: XLA compiles once, replicas get equal shares.
            .batch(batch_size, drop_remainder=True)
            # Vectorised parse of a whole batch; batches decode in parallel.
            .map(parse, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
        )
    else:
        decoded = (
            one_epoch(0)
            .batch(batch_size)
            .map(parse, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
            .unbatch()
            .cache(_cache_file(cache, split, worker_index))
        )
        buffer = max(1, min(examples, shuffle_buffer_bytes // (spec.height * spec.width * 3)))
        batches = (decoded.repeat().shuffle(buffer, seed=seed * 1_000_003 + start_epoch)
                   .batch(batch_size, drop_remainder=True))
    if augment is not None:
        batches = batches.enumerate(start_epoch * steps + skip_batches).map(
            lambda number, batch: augment(*batch, number), num_parallel_calls=AUTOTUNE,
            deterministic=deterministic)
    # Each worker already reads only its own records: tf.distribute must not split again.
    return batches.prefetch(AUTOTUNE).with_options(_options(deterministic, False))


def _cache_file(cache: str, split: str, worker_index: int) -> str:
    """'' (memory) or a file prefix; a killed run's unfinished cache files are removed."""
    if cache == "memory":
        return ""
    prefix = f"{cache.rstrip('/')}/{split}-worker{worker_index}"
    tf.io.gfile.makedirs(cache)
    if not tf.io.gfile.exists(prefix + ".index"):  # complete caches have an index
        for stale in tf.io.gfile.glob(prefix + "*"):
            tf.io.gfile.remove(stale)
    return prefix


def eval_dataset(spec: DataSpec, split: str, batch_size: int) -> tf.data.Dataset:
    """Every example of `split` once, in file order: (uint8 [B, H, W, 3], int64 [B])."""
    paths = [s.path for s in spec.splits[split]]
    batches = math.ceil(spec.num_examples(split) / batch_size)
    return (
        tf.data.TFRecordDataset(paths)
        .batch(batch_size)
        # Known length: Keras shows totals and does not warn that the data "ran out".
        .apply(tf.data.experimental.assert_cardinality(batches))
        .map(lambda serialized: parse_batch(serialized, spec), num_parallel_calls=AUTOTUNE)
        .prefetch(AUTOTUNE)
        .with_options(_options(deterministic=True, shard_by_data=True))
    )


def sample_images(spec: DataSpec, split: str = "train", limit: int = 1024) -> np.ndarray:
    """Up to `limit` decoded images of `split` as uint8 [N, H, W, 3] (statistics fallback)."""
    batches = eval_dataset(spec, split, 128).unbatch().take(limit).batch(limit)
    return next(iter(batches))[0].numpy()
