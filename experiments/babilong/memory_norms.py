"""Norm of every block's memory bank after each segment of a long BABILong-like prompt (books text), for the
trained LM2 model: training rows hold 4 segments, so only memories M_0..M_3 were ever seen in training."""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
text = open(sys.argv[3], encoding="utf-8").read()[20000:40000]  # a book, e.g. ../shared/data/text/austen-sense.txt
ids = torch.tensor([tok(text, add_special_tokens=False).input_ids[: 64 * 24]])
norms = []
captured = {}
mems = [m for m in model.modules() if hasattr(m, "write") and hasattr(m, "init_bank")]
original = [m.write for m in mems]
for i, m in enumerate(mems):

    def write(keys, values, mem, i=i, f=original[i]):
        new = f(keys, values, mem)
        captured.setdefault(i, []).append(new.norm(dim=(-1)).mean().item())
        return new

    m.write = write
with torch.no_grad():
    out = model(ids)
print("mean slot norm of M_s per block (s = 1, 2, ...):")
init = [m.init_bank.view(m.slots, -1).norm(dim=-1).mean().item() for m in mems]
for i in sorted(captured):
    print(f"block {i}: M_0 {init[i]:.2f} | " + " ".join(f"{v:.2f}" for v in captured[i]))
