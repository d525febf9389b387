"""`python -m tests.slow_saves SECONDS <lm2 arguments>`: lm2's CLI whose asynchronous saves hold their background
writer back SECONDS before it writes, so that a test surely acts (trains on, kills, signals) while a save is in
flight. The writer itself is lm2's: only its start is later."""

import sys
import time

from lm2.pipeline.checkpoint.save import PendingSave
from lm2.pipeline.cli import main


def hold_back_writes(seconds: float) -> None:
    write = PendingSave._write

    def held_back(self, *args):
        time.sleep(seconds)
        write(self, *args)

    PendingSave._write = held_back  # the writer thread's target is looked up when a save starts


if __name__ == "__main__":
    hold_back_writes(float(sys.argv.pop(1)))
    sys.exit(main())
