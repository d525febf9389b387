"""Rows/s and tokens/s of the training loader against the tiny model's training consumption.

    python bench/loader_throughput.py --config configs/tiny.yaml --data runs/tiny/data [--micro-batch 8]

Times one epoch of the loader (single process), then forward + backward + AdamW steps of the model on one
batch. Prints one JSON line; `loader_headroom` > 1 means the loader outpaces training.
"""

import argparse
import dataclasses
import json
import time

import torch

from lm2.model.lm import LM2Model
from lm2.pipeline.config import load_config
from lm2.pipeline.data.config import StreamConfig
from lm2.pipeline.data.streaming import build_train_loader
from lm2.pipeline.parallel.init import init_distributed
from lm2.pipeline.parallel.mpu import tensor_parallel


def loader_rate(cfg, dims, micro_batch: int) -> tuple[float, int]:
    loader = build_train_loader(cfg.data, dims, 0, micro_batch, cfg.model)
    rows, start = 0, time.perf_counter()
    for batch in loader:
        rows += len(batch["id"])
    return rows / (time.perf_counter() - start), rows


def training_rate(cfg, micro_batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = LM2Model(cfg.model, tensor_parallel())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch, cfg.model.row_length + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * micro_batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--data", default="runs/tiny/data")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    cfg = load_config(args.config)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, streams=[StreamConfig(args.data)]))
    dims = init_distributed()
    rows_per_s, rows = loader_rate(cfg, dims, args.micro_batch)
    train_rows_per_s = training_rate(cfg, args.micro_batch, args.steps)
    length = cfg.model.row_length
    print(
        json.dumps(
            {
                "bench": "loader_throughput",
                "micro_batch": args.micro_batch,
                "rows": rows,
                "loader_rows_per_s": round(rows_per_s, 1),
                "loader_tokens_per_s": round(rows_per_s * length),
                "train_rows_per_s": round(train_rows_per_s, 2),
                "train_tokens_per_s": round(train_rows_per_s * length),
                "loader_headroom": round(rows_per_s / train_rows_per_s, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
