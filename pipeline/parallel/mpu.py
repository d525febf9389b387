"""DeepSpeedMPU: answers DeepSpeed's process-group questions from megatron-core's parallel_state.

Only for PP=1 (with a PipelineModule DeepSpeed takes its groups from the topology and asserts mpu is None).
Without it DeepSpeed would treat every rank as data-parallel and shard ZeRO state across TP ranks.
"""

from __future__ import annotations

from megatron.core import parallel_state as ps


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
