"""What `lm2` prints: libraries' known-irrelevant notices silenced at their source, and the run's own summaries.

`quiet_libraries()` runs before the libraries are imported. It filters only notices that are known not to concern
lm2 users (a CPU run being told it has no GPU, an optional fused-kernel package being absent); every other warning
still shows. `lm2 --verbose` (or `lm2 train --verbose`) skips it and shows everything.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

IRRELEVANT_WARNINGS = (
    # megatron-core imports fused kernels from Transformer Engine or Apex when present; lm2 uses neither.
    "Transformer Engine and Apex are not installed",
    # DeepSpeed's ZeRO calls torch's renamed collective every step.
    ".*all_gather_into_tensor` is deprecated",
)
IRRELEVANT_LOG_RECORDS = {
    # On a CPU machine: that is what the user asked for.
    "DeepSpeed": re.compile(r"Setting accelerator to CPU"),
    "torch.utils.cpp_extension": re.compile(r"No CUDA runtime is found"),
}
IRRELEVANT_PRINTS = re.compile(r"DeepSpeed \S+ built successfully")
"""DeepSpeed prints (not logs) this when it loads its CPU shared-memory collective."""

_quiet = False


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_libraries() -> None:
    """Silences the notices above for this process. Loggers are configured by name, so the filters hold for loggers
    the libraries create later; wandb reads its settings from the environment when a run starts (its banner and
    summary go, its warnings and errors stay)."""
    global _quiet
    _quiet = True
    for message in IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name, pattern in IRRELEVANT_LOG_RECORDS.items():
        logging.getLogger(name).addFilter(_DropMatching(pattern))
    os.environ.setdefault("WANDB_QUIET", "true")
    os.environ.setdefault("WANDB_SHOW_INFO", "false")


@contextlib.contextmanager
def library_prints() -> Iterator[None]:
    """Around a library call that print()s notices: drops the known-irrelevant lines and passes the rest on."""
    if not _quiet:
        yield
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines(keepends=True) if not IRRELEVANT_PRINTS.search(line)]
        sys.stdout.write("".join(kept))


def human(n: float) -> str:
    """1234567 -> 1.23M."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def saved_line(step: int, folder: Path, seconds: float) -> str:
    return f"saved step {step} ({folder_bytes(folder) / 1e6:.1f} MB, {seconds:.1f} s): {folder}"
