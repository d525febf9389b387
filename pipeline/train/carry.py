"""Carried memory in training (train.carry): every memory block's lane states on this rank, what each step's rows
carry in, the commit after the step, and the states a checkpoint keeps.

A lane is row slot j of micro-batch i on a rank (lane i * micro_batch + j). Every memory block of this rank holds
its lanes' states for its own heads (tensor parallelism) and its own blocks (pipeline stages), in `LaneStates`
(model/memory.py). In `state` mode the rows come from the ordinary loader and a lane's row starts from its previous
row's final memory (fresh on the first step, and with probability train.carry.reset); in `document` mode the lane
loader (data/lanes.py) says each row's lane and where a new document starts.

Checkpoints: every rank writes its lanes' states to `carry_rank_<rank>.pt` beside its RNG state. A resume at the
same layout loads its own file; at another tensor-parallel degree or pipeline split the states are re-sliced by
heads and blocks from the files of the same data-parallel replica. Another data-parallel size, micro-batch or
number of micro-batches changes the lanes themselves: refused unless the run passes `--reset-memory`, which starts
every lane from M_0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state
from torch import nn

from lm2.model.block import DecoderBlock
from lm2.model.errors import CheckpointError
from lm2.model.memory import LaneStates
from lm2.pipeline.checkpoint import safe_load
from lm2.pipeline.checkpoint.format import Manifest, carry_file
from lm2.pipeline.train.config import CarryConfig

MicroBatch = tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]
"""((input_ids, carry), labels): what the engine's forward takes, with the rows' lanes."""


class CarriedMemory:
    """The lanes of this rank's memory blocks.

    Args:
        module: the model the engine trains (an LM2Model or this rank's pipeline stages).
        config: train.carry.
        micro_batch, grad_accum: lanes = grad_accum * micro_batch.
        seed: train.seed, for the state mode's resets.
        device: where the states live.
    """

    def __init__(
        self, module: nn.Module, config: CarryConfig, micro_batch: int, grad_accum: int, seed: int, device: torch.device
    ) -> None:
        self.config, self.micro_batch, self.grad_accum, self.seed = config, micro_batch, grad_accum, seed
        self.memories = {
            block.layer_index: block.memory
            for block in module.modules()
            if isinstance(block, DecoderBlock) and block.memory is not None
        }
        for memory in self.memories.values():
            memory.lane_states = LaneStates(
                self.lanes, memory.local_heads, memory.slots, memory.head_dim, memory.init_bank.dtype, device
            )
        self.device = device
        self.started = False
        """Whether the lanes hold states: a fresh run's (or reset's) first rows start from M_0."""

    @classmethod
    def of_engine(cls, engine, run) -> CarriedMemory:
        """The lanes of `engine` (lm2's Engine, train/engine.py) for run config `run`'s train.carry."""
        return cls(
            engine.deepspeed.module,
            run.train.carry,
            run.train.micro_batch,
            engine.grad_accum,
            run.train.seed,
            engine.deepspeed.device,
        )

    @property
    def lanes(self) -> int:
        return self.grad_accum * self.micro_batch

    def micro_batches(self, step: int, batches: list[dict[str, torch.Tensor]]) -> list[MicroBatch]:
        """The engine's micro-batches of optimizer step number `step` (counted from 0) from the loader's batches
        (already on the device)."""
        resets = self._resets(step) if "carry" not in batches[0] else None
        out = []
        for index, batch in enumerate(batches):
            carry = batch["carry"] if resets is None else self._state_carry(index, resets)
            out.append(((batch["input_ids"], carry), batch["labels"]))
        return out

    def _resets(self, step: int) -> np.ndarray:
        """state mode: which lanes start from M_0 at `step`: all before the lanes hold states, else each with
        probability train.carry.reset (a function of train.seed and the step, so a resume draws the same)."""
        if not self.started:
            return np.ones(self.lanes, dtype=bool)
        return np.random.default_rng([self.seed, step]).random(self.lanes) < self.config.reset

    def _state_carry(self, micro_batch: int, resets: np.ndarray) -> torch.Tensor:
        lanes = np.arange(micro_batch * self.micro_batch, (micro_batch + 1) * self.micro_batch)
        carry = np.stack([lanes, resets[lanes]], axis=1).astype(np.int64)
        return torch.from_numpy(carry).to(self.device)

    def commit(self) -> None:
        """After the step: the states the rows ended with become where the lanes' next rows start."""
        for memory in self.memories.values():
            memory.lane_states.commit()
        self.started = True

    def state_dict(self) -> dict[str, Any]:
        """This rank's file in a checkpoint: its lanes' states per block, and where they sit in the layout."""
        return {
            "blocks": {layer: memory.lane_states.current.cpu() for layer, memory in self.memories.items()},
            "started": self.started,
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "dp_rank": parallel_state.get_data_parallel_rank(),
        }

    def load(self, folder: Path, manifest: Manifest, reset_memory: bool) -> None:
        """The lanes' states of checkpoint `folder`, re-sliced for this rank's heads and blocks; nothing (lanes
        from M_0) with reset_memory or when the checkpoint carried none."""
        saved = manifest.config["train"].get("carry", {}).get("mode", "none")
        if reset_memory or saved == "none":
            return
        old = manifest.config["train"]
        lanes = old["global_batch"] // manifest.layout.dp  # grad_accum * micro_batch
        dp = parallel_state.get_data_parallel_world_size()
        if (manifest.layout.dp, old["micro_batch"], lanes) != (dp, self.micro_batch, self.lanes):
            raise CheckpointError(
                f"{folder} carried memory in {manifest.layout.dp} replica(s) x {lanes} lanes of micro-batches of "
                f"{old['micro_batch']} rows; this run has {dp} x {self.lanes} of {self.micro_batch}: the lanes "
                "cannot be mapped; resume with the old data-parallel size, micro-batch and global batch, or pass "
                "--reset-memory to keep the data position and restart every lane from M_0"
            )
        files = _replica_files(folder, manifest.layout.world_size, parallel_state.get_data_parallel_rank())
        for layer, memory in self.memories.items():
            memory.lane_states.current.copy_(_my_heads(files, layer, memory.lane_states.current.shape[1]))
        self.started = all(file["started"] for file in files)


def _replica_files(folder: Path, world_size: int, dp_rank: int) -> list[dict[str, Any]]:
    """The carry files of every rank of data-parallel replica `dp_rank` of the checkpoint."""
    files = []
    for rank in range(world_size):
        path = carry_file(folder, rank)
        if not path.is_file():
            raise CheckpointError(
                f"{folder} lacks {path.name}: its carried memory is incomplete; resume an earlier "
                "checkpoint, or pass --reset-memory"
            )
        state = safe_load.load(path)
        if state["dp_rank"] == dp_rank:
            files.append(state)
    return files


def _my_heads(files: list[dict[str, Any]], layer: int, local_heads: int) -> torch.Tensor:
    """Block `layer`'s lane states [lanes, local_heads, N, dh] for this rank's heads, from the TP shards that hold
    the block (joined along the heads, then sliced for this rank's TP degree)."""
    holders = sorted((file for file in files if layer in file["blocks"]), key=lambda file: file["tp_rank"])
    full = torch.cat([file["blocks"][layer] for file in holders], dim=1)
    rank = parallel_state.get_tensor_model_parallel_rank()
    return full[:, rank * local_heads : (rank + 1) * local_heads]
