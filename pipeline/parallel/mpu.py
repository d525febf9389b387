"""megatron-core's parallel_state, read at the edges only: `tensor_parallel` hands the model its TP context,
`DeepSpeedMPU` answers DeepSpeed's process-group questions.

DeepSpeedMPU is only for PP=1 (with a PipelineModule DeepSpeed takes its groups from the topology and asserts mpu
is None). Without it DeepSpeed would treat every rank as data-parallel and shard ZeRO state across TP ranks.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from lm2.model.layers import TensorParallel


def tensor_parallel(params_dtype: torch.dtype = torch.float32) -> TensorParallel:
    """This rank's tensor-parallel context for building an LM2Model (after init_distributed)."""
    return TensorParallel.of_group(ps.get_tensor_model_parallel_group(), params_dtype)


class DeepSpeedMPU:
    def get_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    # DeepSpeed also asks under megatron's tensor-parallel names.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()
