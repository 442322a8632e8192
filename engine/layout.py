"""The parallel layout: world size = cfg × ulysses × ring, validated before any weight loads."""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class ParallelLayout:
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.sp * self.cfg

    def describe(self) -> str:
        return f"U{self.ulysses}R{self.ring}C{self.cfg}"

    def validate(self, world_size: int, num_heads: int, min_tokens: int | None = None) -> None:
        """Raise LayoutError with a message a user can act on."""
        if self.cfg not in (1, 2):
            raise LayoutError(f"--cfg must be 1 or 2, got {self.cfg}")
        if self.ulysses < 1 or self.ring < 1:
            raise LayoutError(f"--ulysses and --ring must be >= 1, got {self.ulysses} and {self.ring}")
        if self.world_size != world_size:
            raise LayoutError(
                f"ulysses × ring × cfg = {self.ulysses} × {self.ring} × {self.cfg} = "
                f"{self.world_size}, but {world_size} processes were started (--nproc)"
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
