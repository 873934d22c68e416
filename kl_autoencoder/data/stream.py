"""`ShardStream`: endless training items from a `ShardSet`, resumable from the number of batches seen.

Every epoch the shard list is shuffled (seeded by (seed, epoch)); rank r takes every world-th shard from r, and
DataLoader worker w takes every W-th of those from w, so within an epoch every sample is read by exactly one worker of
one rank. Each worker runs its own endless sequence of epochs through a shuffle buffer (`data.shuffle_buffer` encoded
samples, webdataset's `shuffle`; its draws seeded by (seed, rank, worker, position)), so the DataLoader's round-robin
makes batch b come from worker b mod W, and after `batches_seen` batches worker w has produced a known number of
samples. A resumed stream recomputes which samples its buffer held and reads on from the oldest of them, passing
earlier shards by their sample counts: tar shards' counts travel from the workers in the batches and are saved in the
checkpoint (`trainer_state.json`), so a resume opens no shard it has consumed (remote `pipe:`/http shards are not
downloaded again), and nothing is decoded twice. Exact resume therefore needs the same processes, DataLoader workers,
batch size, buffer and shards as the run that wrote the checkpoint; the trainer refuses another number of processes
or workers.

Bad members (corrupt image, a sample without an image, a shard truncated mid-member) become skipped items counted in
the batch like a folder's bad files; a shard that cannot be opened at all is a `ShardError` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kl_autoencoder.data.images import BadImageError, SkipLog
from kl_autoencoder.data.sharding import Sample, ShardError, ShardSet, decode_sample, describe
from kl_autoencoder.data.transforms import ImageTransform

if TYPE_CHECKING:
    from kl_autoencoder.config import DataConfig


def epoch_shards(num_shards: int, seed: int, epoch: int, rank: int, world: int, worker: int, workers: int,
                 shuffle: bool = True) -> list[int]:
    """The shards worker `worker` of rank `rank` reads in `epoch`: a seeded permutation, every world-th, every W-th."""
    if shuffle:
        order = torch.randperm(num_shards, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    else:
        order = list(range(num_shards))
    return order[rank::world][worker::workers]


def usable_workers(num_shards: int, world: int, workers: int) -> int:
    """DataLoader workers that all get a shard on every rank (at least 1, the main process when `workers` is 0)."""
    per_rank = num_shards // world
    if per_rank == 0:
        raise ShardError(f"{num_shards} shard(s) cannot feed {world} processes: each process needs at least one shard")
    return max(1, min(workers, per_rank))


SHUFFLE_DRAWS = 1 << 16  # slot draws per seeded chunk of a shuffle buffer


def shuffle_slots(key: Sequence[int], size: int, chunk: int) -> np.ndarray:
    """The slots a worker's shuffle buffer of `size` empties for outputs chunk * SHUFFLE_DRAWS onwards (SHUFFLE_DRAWS
    of them): a pure function of `key` (seed, rank, worker) and `chunk`, so any position can be recomputed."""
    if size == 1:
        return np.zeros(SHUFFLE_DRAWS, np.int64)
    return np.random.default_rng([*key, chunk]).integers(0, size, SHUFFLE_DRAWS)


def buffer_after(outputs: int, size: int, key: Sequence[int]) -> np.ndarray:
    """The input index each slot of a shuffle buffer holds after `outputs` outputs, computed without reading anything.

    The buffer starts with inputs 0..size-1 in slots 0..size-1, and output t empties slot s_t and refills it with
    input size + t: a slot holds size + the last t that drew it, or its first input if none did."""
    if size == 1:
        return np.array([outputs])
    last = np.full(size, -1, np.int64)
    for chunk in range(-(-outputs // SHUFFLE_DRAWS)):
        first = chunk * SHUFFLE_DRAWS
        slots = shuffle_slots(key, size, chunk)[:outputs - first]
        drawn, at_reversed = np.unique(slots[::-1], return_index=True)  # the last draw of each slot in this chunk
        last[drawn] = first + len(slots) - 1 - at_reversed
    return np.where(last < 0, np.arange(size), last + size)


def shuffle_buffer(read: Callable[[int], Iterator[tuple[int, Any]]], size: int, key: Sequence[int], done: int
                   ) -> Iterator[Any]:
    """The outputs of a shuffle buffer of `size` from output `done` on, over the inputs `read(first)` yields as
    (input index, entry) from input `first` on: output t takes the entry in slot s_t (`shuffle_slots`) and puts the next
    input there. What the buffer held after `done` outputs is recomputed (`buffer_after`) and read again from its
    oldest input; when a finite input runs out the buffer empties in slot order."""
    held = buffer_after(done, size, key)
    slot_of = {int(index): slot for slot, index in enumerate(held)}
    buffer: list[Any] = [None] * size
    inputs = read(int(held.min()))
    for index, entry in inputs:  # fill the buffer with what it held at this position (read again, not decoded)
        if index in slot_of:
            buffer[slot_of[index]] = entry
        if index >= done + size - 1:
            break
    chunk, skip = divmod(done, SHUFFLE_DRAWS)
    while True:
        for slot in shuffle_slots(key, size, chunk)[skip:].tolist():
            entry, refill = buffer[slot], next(inputs, None)
            if refill is None:  # a finite stream ran out: the buffer empties in slot order
                yield from (held_entry for held_entry in buffer if held_entry)
                return
            buffer[slot] = refill[1]
            yield entry
        chunk, skip = chunk + 1, 0


class ShardStream(IterableDataset):
    """Endless training items from a `ShardSet`, this rank's and this worker's share, from a resume position.

    Items are those of `items.ImageDataset` ({"pixel_values", "path", "skipped"}) plus "key", "epoch" and
    "shard_counts" (tar shards whose sample count this worker found, for the main process to record); each item's
    random crop/flip is seeded by (seed, epoch, shard, sample), so a resumed run sees the same crops.

    With `shuffle_buffer` > 1 (training) each worker passes its samples through a shuffle buffer of that many
    encoded samples (webdataset's `shuffle`, decoded when they leave it): output t takes the sample in slot s_t and
    puts the next sample read there, s_t drawn from (seed, rank, worker, t). A resume recomputes which samples the
    buffer held (`buffer_after`) and reads them again from the oldest one's shard on; nothing is decoded twice."""

    def __init__(self, shards: ShardSet, transform: ImageTransform, seed: int = 0, shuffle: bool = True,
                 epochs: int | None = None, shuffle_buffer: int = 0):
        super().__init__()
        self.shards, self.transform, self.resolution = shards, transform, transform.resolution
        self.seed, self.shuffle, self.epochs, self.shuffle_buffer = seed, shuffle, epochs, shuffle_buffer
        self.rank, self.world, self.workers, self.batch_size, self.batches_seen = 0, 1, 1, 1, 0
        self.skipped = SkipLog()

    def at(self, rank: int, world: int, workers: int, batch_size: int, batches_seen: int,
           seed: int | None = None) -> "ShardStream":
        """A copy positioned for `rank` of `world` with `workers` logical workers after `batches_seen` batches."""
        share = ShardStream.__new__(ShardStream)
        share.__dict__.update(self.__dict__)
        share.rank, share.world, share.batch_size, share.batches_seen = rank, world, batch_size, batches_seen
        share.workers = usable_workers(len(self.shards), world, workers)
        share.seed = self.seed if seed is None else seed
        return share

    def consumed(self, logical: int) -> int:
        """Samples logical worker `logical` had produced when `batches_seen` batches were taken round-robin."""
        rounds, extra = divmod(self.batches_seen, self.workers)
        return (rounds + (1 if logical < extra else 0)) * self.batch_size

    def _item(self, entry: tuple[Sample, int, int, int], in_worker: bool) -> dict:
        sample, shard, offset, epoch = entry
        name = self.shards.name(shard, sample.key)
        base = {"key": sample.key, "epoch": epoch, "shard_counts": self.shards.take_learned()}
        try:
            image = decode_sample(sample, name, self.transform.source_side, self.shards.local_paths)
        except BadImageError as err:
            if not in_worker:
                self.skipped.add(err.path, err.reason)
            return {**base, "pixel_values": None, "path": None, "skipped": [(err.path, err.reason)]}
        item_seed = ((self.seed * 1_000_003 + epoch) * 1_000_003 + shard) * 1_000_003 + offset
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed % (2**63))
            pixels = self.transform(image)
        return {**base, "pixel_values": pixels, "path": name, "skipped": []}

    def _inputs(self, logical: int, first: int) -> Iterator[tuple[int, tuple[Sample, int, int, int]]]:
        """This worker's samples in reading order over its epochs, (input index, (sample, shard, offset, epoch)), from
        input `first` on: whole shards before it are passed by their sample counts (recorded ones read nothing)."""
        index, epoch = 0, 0
        while self.epochs is None or epoch < self.epochs:
            mine = epoch_shards(len(self.shards), self.seed, epoch, self.rank, self.world, logical, self.workers,
                                self.shuffle)
            any_sample = False
            for shard in mine:
                count = self.shards.known_count(shard) if index < first else None
                if count is not None and index + count <= first:
                    any_sample |= count > 0
                    index += count
                    continue
                walked = 0
                for offset, sample in enumerate(self.shards.walk(shard, max(0, first - index))):
                    walked = offset + 1
                    if sample is not None:
                        yield index + offset, (sample, shard, offset, epoch)
                self.shards.learn(shard, walked)  # read to its end: its count costs nothing now
                any_sample |= walked > 0
                index += walked
            if not any_sample:
                raise ShardError(f"no samples in the shards of rank {self.rank}, worker {logical}: "
                                 f"{describe([self.shards.files[i] for i in mine])}")
            epoch += 1


    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"ShardStream positioned for {self.workers} workers runs in {info.num_workers}")
        logical = (physical + self.batches_seen) % self.workers  # the DataLoader starts at physical worker 0
        size = max(1, self.shuffle_buffer) if self.shuffle else 1
        key = (self.seed % 2**64, self.rank, logical)
        entries = shuffle_buffer(partial(self._inputs, logical), size, key, self.consumed(logical))
        yield from (self._item(entry, info is not None) for entry in entries)


def shard_stream(kind: str, files: Sequence[str], data_cfg: DataConfig, transform: ImageTransform, train: bool
                 ) -> ShardStream:
    """The stream over shards of format `kind`: shuffled and endless for training, one pass in order otherwise."""
    return ShardStream(ShardSet(kind, files, data_cfg.image_column, data_cfg.allow_local_paths), transform,
                       shuffle=train, epochs=None if train else 1, shuffle_buffer=data_cfg.shuffle_buffer)
