"""Lanes of documents, for carried memory (`train.carry.mode: document`): every lane reads one document's rows in
order, one row per step, so the memory a row ends with is where the document's next row starts.

A data-parallel replica has `lanes_per_replica` = grad_accum * micro_batch lanes: lane i * micro_batch + j is row
j of its micro-batch i, every step. Replica r's lane l is global lane r * lanes_per_replica + l.

The schedule. An epoch's plan is a list of work items (document, first row): the epoch's document order (a
permutation seeded by data.shuffle_seed and the epoch), after a `--reset-memory` resume preceded by the documents
the lanes were in the middle of. Global lanes take the plan's items in order: a lane that has finished its
document takes the next item, the lowest lane first when several are free at the same step. Every rank computes
the same schedule from the documents table (prepare.py's documents.npy), so replicas read disjoint documents and
every document is read exactly once per epoch. The epoch ends when the last lane finishes; lanes that finish
earlier read padding rows (no loss) until then. A row starts fresh (the memory returns to M_0) where its lane
starts an item: a new document, or a document continued after a reset.

The loader's position is (epoch, plan, step in the plan); a checkpoint also records the layout the lanes had, so
a resume at another data-parallel size or micro-batch can be refused (the lanes' memory cannot be mapped) or, with
`--reset-memory`, continue the documents in progress on the new lanes, fresh.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lm2.model.errors import CheckpointError, DataError
from lm2.model.lm import IGNORE_INDEX


@dataclass(frozen=True)
class Assignment:
    """A work item as the schedule placed it: global lane `lane` reads rows first_row.. of `document` from step
    `start`, `rows` of them."""

    lane: int
    start: int
    document: int
    first_row: int
    rows: int


def schedule(items: list[tuple[int, int]], rows_per_document: np.ndarray, lanes: int) -> tuple[list[Assignment], int]:
    """Places the work items (document, first row) on `lanes` global lanes in order; returns the assignments (in
    item order) and the plan's length in steps."""
    free = [(0, lane) for lane in range(lanes)]  # (the step from which the lane is free, lane)
    assignments = []
    for document, first_row in items:
        start, lane = heapq.heappop(free)
        rows = int(rows_per_document[document]) - first_row
        assignments.append(Assignment(lane, start, document, first_row, rows))
        heapq.heappush(free, (start + rows, lane))
    return assignments, max(step for step, _ in free)


@dataclass
class Plan:
    """An epoch's work items: `prefix` (documents in progress at a reset, (document, first row)), then the epoch's
    document order from index `order_start`."""

    epoch: int
    prefix: list[tuple[int, int]]
    order_start: int

    def items(self, order: np.ndarray) -> list[tuple[int, int]]:
        return [*self.prefix, *((int(document), 0) for document in order[self.order_start :])]


class LaneLoader:
    """Micro-batches of document lanes for one data-parallel replica; iterating yields the rest of an epoch.

    Each micro-batch is a dict of `input_ids` and `labels` [micro_batch, row_length] (PAD and masked labels are
    IGNORE_INDEX), `id` [micro_batch] row ids, and `carry` [micro_batch, 2] int64: each row's lane on this rank and
    1 where it starts fresh. A padding row has lane and fresh set, and no labels.

    Args:
        read_row: sample index -> the row's sample dict (a StreamingDataset's get_item).
        rows_per_document: every document's row count, documents of all streams in sample order.
        first_sample: every document's first sample index.
        dp, dp_rank, micro_batch, grad_accum: the layout; lanes per replica = grad_accum * micro_batch.
        shuffle, seed: the epochs' document order.
        pad_id, width: PAD token and tokens per row (row_length + 1), for padding rows.
    """

    def __init__(
        self,
        read_row,
        rows_per_document: np.ndarray,
        first_sample: np.ndarray,
        dp: int,
        dp_rank: int,
        micro_batch: int,
        grad_accum: int,
        shuffle: bool,
        seed: int,
        pad_id: int,
        width: int,
        tokenizer_sha256: str | None = None,
    ) -> None:
        self.tokenizer_sha256 = tokenizer_sha256
        """The tokenizer the rows were made with (checkpoints record it)."""
        self.read_row, self.rows_per_document, self.first_sample = read_row, rows_per_document, first_sample
        self.dp, self.dp_rank, self.micro_batch, self.grad_accum = dp, dp_rank, micro_batch, grad_accum
        self.shuffle, self.seed, self.pad_id, self.width = shuffle, seed, pad_id, width
        self.plan = Plan(0, [], 0)
        self.step = 0  # steps of the plan read so far
        self._micro = 0  # micro-batches of the current step read so far

    @property
    def lanes_per_replica(self) -> int:
        return self.grad_accum * self.micro_batch

    def order(self, epoch: int) -> np.ndarray:
        documents = len(self.rows_per_document)
        if not self.shuffle:
            return np.arange(documents)
        return np.random.default_rng([self.seed, epoch]).permutation(documents)

    def _lanes(self) -> tuple[list[list[Assignment]], int]:
        """This replica's lanes' assignments (each by start step) and the plan's length."""
        assignments, length = schedule(
            self.plan.items(self.order(self.plan.epoch)), self.rows_per_document, self.dp * self.lanes_per_replica
        )
        first = self.dp_rank * self.lanes_per_replica
        mine: list[list[Assignment]] = [[] for _ in range(self.lanes_per_replica)]
        for assignment in assignments:
            if first <= assignment.lane < first + self.lanes_per_replica:
                mine[assignment.lane - first].append(assignment)
        return mine, length

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        lanes, length = self._lanes()
        if length == 0:
            raise DataError("the dataset holds no documents: prepare it with --packing document")
        starts = [[a.start for a in lane] for lane in lanes]
        while self.step < length:
            first = self._micro * self.micro_batch
            rows = [self._row(lanes[lane], starts[lane], lane) for lane in range(first, first + self.micro_batch)]
            self._micro += 1
            if self._micro == self.grad_accum:  # the step is read: the position moves on before the yield
                self.step, self._micro = self.step + 1, 0
            yield self._collate(rows)
        self.plan, self.step = Plan(self.plan.epoch + 1, [], 0), 0

    def _row(self, lane: list[Assignment], starts: list[int], index: int) -> tuple[dict | None, int, bool]:
        """(the sample dict, or None for a padding row; the lane; whether the row starts fresh) at this step."""
        at = bisect.bisect_right(starts, self.step) - 1
        if at < 0 or self.step >= lane[at].start + lane[at].rows:
            return None, index, True
        assignment = lane[at]
        offset = self.step - assignment.start
        sample = self.read_row(int(self.first_sample[assignment.document]) + assignment.first_row + offset)
        return sample, index, offset == 0

    def _collate(self, rows: list[tuple[dict | None, int, bool]]) -> dict[str, torch.Tensor]:
        pad = {"tokens": np.full(self.width, self.pad_id), "id": -1}
        tokens = torch.from_numpy(np.stack([(s or pad)["tokens"] for s, _, _ in rows]).astype(np.int64))
        labels = tokens[:, 1:].clone()
        labels[labels == self.pad_id] = IGNORE_INDEX
        for i, (sample, _, _) in enumerate(rows):
            if sample is not None and "mask" in sample:
                labels[i, torch.from_numpy(sample["mask"][1:] == 0)] = IGNORE_INDEX
        carry = torch.tensor([[lane, int(fresh)] for _, lane, fresh in rows], dtype=torch.int64)
        ids = torch.tensor([int((s or pad)["id"]) for s, _, _ in rows], dtype=torch.int64)
        return {"input_ids": tokens[:, :-1], "labels": labels, "id": ids, "carry": carry}

    def state_dict(self) -> dict[str, Any]:
        """The position (between steps) and the layout whose lanes it belongs to."""
        if self._micro:
            raise RuntimeError("the lane loader's position is only defined between steps")
        return {
            "kind": "lanes",
            "epoch": self.plan.epoch,
            "prefix": [list(item) for item in self.plan.prefix],
            "order_start": self.plan.order_start,
            "step": self.step,
            "dp": self.dp,
            "lanes_per_replica": self.lanes_per_replica,
        }

    def load_state_dict(self, state: dict[str, Any], reset_memory: bool = False) -> None:
        """Resumes at `state`; at another layout only with reset_memory (the documents in progress continue,
        fresh, on this layout's lanes)."""
        if state.get("kind") != "lanes":
            raise CheckpointError(
                "the checkpoint's data position is not of document lanes (train.carry.mode was "
                "not document): resume with the carry mode it was written with"
            )
        plan = Plan(state["epoch"], [tuple(item) for item in state["prefix"]], state["order_start"])
        same = (state["dp"], state["lanes_per_replica"]) == (self.dp, self.lanes_per_replica)
        if same and not reset_memory:
            self.plan, self.step = plan, state["step"]
            return
        if not reset_memory:
            raise CheckpointError(
                f"the checkpoint's memory lanes were {state['dp']} replica(s) x {state['lanes_per_replica']} lanes "
                f"(grad_accum x micro_batch), this run has {self.dp} x {self.lanes_per_replica}: the carried memory "
                "cannot be mapped onto other lanes; resume with the old data-parallel size and micro-batch, or pass "
                "--reset-memory to keep the data position and restart every lane from M_0"
            )
        self.plan, self.step = self._continued(plan, state["step"], state["dp"] * state["lanes_per_replica"]), 0

    def _continued(self, plan: Plan, step: int, lanes: int) -> Plan:
        """The plan of the rest of `plan` after `step` steps on `lanes` global lanes: first the documents then in
        progress (from their next row, in lane order), then the items no lane had started."""
        items = plan.items(self.order(plan.epoch))
        assignments, _ = schedule(items, self.rows_per_document, lanes)
        in_progress = sorted(
            (a.lane, a.document, a.first_row + step - a.start) for a in assignments if a.start < step < a.start + a.rows
        )
        waiting = next((i for i, a in enumerate(assignments) if a.start >= step), len(assignments))
        prefix = [(document, row) for _, document, row in in_progress] + list(plan.prefix[waiting:])
        return Plan(plan.epoch, prefix, plan.order_start + max(0, waiting - len(plan.prefix)))
