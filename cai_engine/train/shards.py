"""Generation stages under torchrun: each rank takes one contiguous block of the items (prompts, pairs), writes
its records to its own resumable shard file next to the output, and rank 0 gathers the shards, in rank order,
into the output. The output is the same file a single process writes when each record depends only on its
item and the seed: a single process is the one-shard case, whose shard file is the output itself.

    critique/revisions.jsonl               <- gathered (atomic write) once every shard holds its whole block
    critique/revisions.rank0-of-2.jsonl    <- rank 0's block, appended and resumed as the output would be
    critique/revisions.rank1-of-2.jsonl

A killed run resumes from the shards of its own world size. Shards of another world size are gathered when
they are complete; unfinished ones are refused, naming the files: their blocks do not line up with this run's
and the records they hold are cheaper to redo than to re-split.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable

from ..io import atomic_write_bytes, read_jsonl
from .config import ConfigError
from .distributed import barrier, broadcast_from_main, rank, world_size


def block(total: int, index: int, world: int, unit: int = 1) -> range:
    """Item positions of shard `index` of `world`: contiguous, whole `unit`s of items (a stage's batches, whose
    makeup changes the last bits of a batched forward), as many units in each as can be."""
    units = -(-total // unit)
    return range(min(total, unit * (units * index // world)), min(total, unit * (units * (index + 1) // world)))


def shard_path(output: Path, index: int, world: int) -> Path:
    return output if world == 1 else output.with_name(f"{output.stem}.rank{index}-of-{world}{output.suffix}")


@dataclass(slots=True)
class Shards:
    output: Path
    keys: list[Hashable]                  # identity of each item, in output order
    key_of: Callable[[Any], Hashable]     # the identity of the item a record was made for
    rank: int
    world: int
    unit: int                             # blocks are made of whole units of this many items
    finished: bool                        # the output already holds every item's record: nothing to do

    @property
    def items(self) -> range:
        """This rank's item positions."""
        return block(len(self.keys), self.rank, self.world, self.unit)

    @property
    def path(self) -> Path:
        """Where this rank writes its records (the output itself without torchrun)."""
        return shard_path(self.output, self.rank, self.world)

    def complete(self) -> bool:
        """This rank's shard holds its whole block."""
        return self.finished or _holds(self.path, [self.keys[i] for i in self.items], self.key_of)


def open_shards(output: Path, keys: list[Hashable], key_of: Callable[[Any], Hashable], unit: int = 1) -> Shards:
    """Every rank calls this before generating. Rank 0 looks at what earlier runs left (gathering complete
    shards of any world size, refusing unfinished ones of another) and tells every rank the verdict."""
    world = world_size()
    finished = broadcast_from_main(lambda: _inspect(output, keys, key_of, world, unit))
    return Shards(output, keys, key_of, rank(), world, unit, finished)


def gather(shards: Shards) -> None:
    """Every rank calls this after writing its shard; rank 0 writes the output once all shards are whole."""
    if shards.world == 1 or shards.finished:
        return
    barrier()
    broadcast_from_main(lambda: _gather(shards.output, shards.keys, shards.key_of, shards.world, shards.unit))


def _holds(path: Path, keys: list[Hashable], key_of) -> bool:
    return [key_of(record) for record in read_jsonl(path)] == keys


def _leftovers(output: Path) -> dict[int, list[Path]]:
    """Shard files next to the output, by the world size that wrote them."""
    pattern = re.compile(rf"{re.escape(output.stem)}\.rank(\d+)-of-(\d+){re.escape(output.suffix)}")
    found: dict[int, list[Path]] = {}
    for path in sorted(output.parent.glob(f"{output.stem}.rank*-of-*{output.suffix}")):
        match = pattern.fullmatch(path.name)
        if match:
            found.setdefault(int(match.group(2)), []).append(path)
    return found


def _inspect(output: Path, keys: list[Hashable], key_of, world: int, unit: int) -> bool:
    leftovers = _leftovers(output)
    if _holds(output, keys, key_of):
        for paths in leftovers.values():  # a gather that was killed after its write, before the clean-up
            for path in paths:
                path.unlink(missing_ok=True)
        return True
    for other, paths in sorted(leftovers.items()):
        if all(_holds(shard_path(output, i, other), [keys[j] for j in block(len(keys), i, other, unit)], key_of)
               for i in range(other)):
            _gather(output, keys, key_of, other, unit)
            return True
        if other != world:
            raise ConfigError(f"unfinished shards of a {other}-process run: {', '.join(p.name for p in paths)} in "
                              f"{output.parent}; finish them with --nproc_per_node {other}, or delete them to start over")
    if world > 1 and output.is_file() and output.stat().st_size:
        raise ConfigError(f"{output} holds an unfinished single-process run; finish it without torchrun, or delete "
                          "it to start over")
    return False


def _gather(output: Path, keys: list[Hashable], key_of, world: int, unit: int) -> None:
    parts = []
    for i in range(world):
        path, expected = shard_path(output, i, world), [keys[j] for j in block(len(keys), i, world, unit)]
        if not _holds(path, expected, key_of):
            raise ConfigError(f"{path}: does not hold the {len(expected)} records of rank {i}'s block; "
                              "rerun the same command to finish it")
        parts.append(path.read_bytes())  # whole lines (read_jsonl cut any torn tail): the exact bytes written
    atomic_write_bytes(output, b"".join(parts))
    for i in range(world):
        shard_path(output, i, world).unlink(missing_ok=True)
