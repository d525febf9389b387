"""ParallelDims: the one place where parallel degrees are derived and checked."""

from __future__ import annotations

from dataclasses import dataclass

from lm2.model.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """world_size = tp * dp * pp. Rank order is TP fastest, then DP, then PP slowest: megatron-core's
    "tp-cp-ep-dp-pp" and DeepSpeed's PipeModelDataParallelTopology axes [pipe, data, model] agree on it."""

    world_size: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.world_size % (self.tp * self.pp):
            raise ConfigError(
                f"world size {self.world_size} is not divisible by parallel.tp * parallel.pp = {self.tp * self.pp}: "
                "launch a multiple of tp*pp processes or change the degrees"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)
