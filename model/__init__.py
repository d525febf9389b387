"""The LM2 model: single-device code whose only concession to parallelism is megatron-core's TP layers.

config.py (ModelConfig, MemoryConfig), memory.py (the memory module), attention.py, mlp.py, block.py
(DecoderBlock), lm.py (LM2Model), layers.py (TensorParallel, the TP linears, RMSNorm, RoPE), accounting.py
(parameter and FLOP counts), errors.py (LM2Error and its kinds, shared with pipeline/). The caller passes the
tensor-parallel context in; nothing here reads global parallel state. Import from the submodules: importing
this package stays cheap (megatron-core is loaded only by the modules that build layers).
"""
