"""The parallel layout: world size = dp × cfg × ulysses × ring, validated before any weight loads.

`dp` replicas of `cfg × ulysses × ring` ranks each: replica r is ranks [r·size, (r+1)·size),
the order xfuser gives its data-parallel groups, so each replica's SP and CFG groups lie inside it.
"""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class ParallelLayout:
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    dp: int = 1

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def replica_size(self) -> int:
        """Ranks that run one job together."""
        return self.sp * self.cfg

    @property
    def world_size(self) -> int:
        return self.replica_size * self.dp

    def replica_ranks(self, replica: int) -> range:
        return range(replica * self.replica_size, (replica + 1) * self.replica_size)

    def describe(self) -> str:
        one = f"U{self.ulysses}R{self.ring}C{self.cfg}"
        return f"{self.dp}x{one}" if self.dp > 1 else one

    def validate(self, world_size: int, num_heads: int, min_tokens: int | None = None) -> None:
        """Raise LayoutError with a message a user can act on."""
        if self.cfg not in (1, 2):
            raise LayoutError(f"--cfg must be 1 or 2, got {self.cfg}")
        if self.ulysses < 1 or self.ring < 1 or self.dp < 1:
            raise LayoutError(f"--ulysses, --ring and --dp must be >= 1, got {self.ulysses}, "
                              f"{self.ring} and {self.dp}")
        if self.world_size != world_size:
            raise LayoutError(
                f"dp × ulysses × ring × cfg = {self.dp} × {self.ulysses} × {self.ring} × "
                f"{self.cfg} = {self.world_size}, but {world_size} processes were started "
                "(--nproc, times --nnodes)"
            )
        if num_heads % self.ulysses != 0:
            raise LayoutError(
                f"--ulysses {self.ulysses} must divide the model's {num_heads} attention heads"
            )
        if min_tokens is not None and min_tokens < self.sp:
            raise LayoutError(
                f"the smallest allowed video has {min_tokens} tokens, fewer than the "
                f"sequence-parallel degree {self.sp}: some ranks would get no token"
            )
