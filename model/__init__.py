"""The LM2 model: single-device code whose only concession to parallelism is megatron-core's TP layers.

config.py (ModelConfig, MemoryConfig), memory.py (the memory module), attention.py, mlp.py, block.py
(DecoderBlock), lm.py (LM2Model), accounting.py (parameter and FLOP counts). Import from the submodules:
importing this package stays cheap (megatron-core is loaded only by the modules that build layers).
"""
