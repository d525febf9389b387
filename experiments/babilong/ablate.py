"""Ablation of the trained LM2 model's memory: the exported model with every block's memory read switched off
(out-gate bias -1e4, so the gated read is 0 and the block is the plain backbone), saved beside the original."""

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

source, target = Path(sys.argv[1]), Path(sys.argv[2])
shutil.rmtree(target, ignore_errors=True)
shutil.copytree(source, target)
for f in target.glob("*.safetensors"):
    tensors = load_file(f)
    changed = [k for k in tensors if k.endswith("out_gate_bias")]
    for k in changed:
        tensors[k].fill_(-1e4)
    save_file(tensors, f, metadata={"format": "pt"})
    print(f"{f.name}: {len(changed)} out_gate_bias tensors set to -1e4")
