"""Conversion between lm2 checkpoints and Hugging Face folders: `lm2 export hf` and `lm2 import hf`.

`names` is the one parameter-name table; `folder` writes the Hugging Face folder (vanilla: LlamaForCausalLM; LM2:
`configuration_lm2.py` + `modeling_lm2.py`, standalone files copied into the folder); `export` reads a checkpoint
of any layout (through `lm2.pipeline.checkpoint.reader`) and writes it; `verify` compares the exported model's
logits with lm2's; `importer` turns a Hugging Face Llama into a step-0 training checkpoint.
"""
