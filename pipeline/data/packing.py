"""Packing documents into training rows of `width` = row_length + 1 tokens (a row gives row_length inputs and their
shifted labels).

A document arrives as a [2, n] array: its tokens (EOS last) and its loss mask, 1 where the token is a target of
the loss: everywhere, unless the input marks spans without loss (a prompt before its answer). A long text arrives in
pieces (sources.Chunk): `first` and `last` say which; the rows are those of the whole document. Rows come out as
[rows, 2, width] arrays of the same two channels; PAD fills get mask 0.

- concat: rows are cut from the stream "doc0 EOS doc1 EOS ...", without overlap.
- whole: the same, but a document that fits in one row never straddles two: the row it would overflow is filled
  with PAD and the document starts the next one (bAbI stories in haystacks, whose question must see its facts).
- document: every document gets rows of its own, consecutive rows overlapping by one token (a row's last token is
  the next row's first input), so the rows' inputs tile the document exactly; its last row is padded. Each row is
  tagged with its document and its position in it: carried memory (`train.carry.mode: document`) reads a
  document's rows in order in one lane, its memory continuing from row to row.
"""

from __future__ import annotations

import numpy as np

PACKINGS = ("concat", "whole", "document")


class StreamPacker:
    """concat and whole packing; `finish` pads the last partial row."""

    def __init__(self, width: int, pad_id: int, dtype: np.dtype, whole: bool = False) -> None:
        self.width, self.pad_id, self.dtype, self.whole = width, pad_id, dtype, whole
        self.pending = np.empty((2, 0), dtype=dtype)
        self.padding = 0

    def add(self, piece: np.ndarray, first: bool = True, last: bool = True) -> np.ndarray:
        """The rows that `piece` (a document, or the part of one that `first` and `last` describe) completes."""
        closed = np.empty((0, 2, self.width), self.dtype)
        length = piece.shape[1]
        if self.whole and first and last and length <= self.width < self.pending.shape[1] + length:
            closed = self._pad_pending()
        stream = np.concatenate([self.pending, piece.astype(self.dtype)], axis=1)
        full = stream.shape[1] // self.width * self.width
        self.pending = stream[:, full:]
        rows = stream[:, :full].reshape(2, -1, self.width).transpose(1, 0, 2)
        return np.concatenate([closed, rows])

    def finish(self) -> np.ndarray:
        """The last, padded row (none if the stream ended on a row boundary)."""
        return self._pad_pending() if self.pending.shape[1] else np.empty((0, 2, self.width), self.dtype)

    def _pad_pending(self) -> np.ndarray:
        row = pad_row(self.pending, self.width, self.pad_id)
        self.padding += self.width - self.pending.shape[1]
        self.pending = np.empty((2, 0), dtype=self.dtype)
        return row[None]


class DocumentPacker:
    """document packing: each document's own rows, overlapping by one token."""

    def __init__(self, width: int, pad_id: int, dtype: np.dtype) -> None:
        self.width, self.pad_id, self.dtype = width, pad_id, dtype
        self.pending = np.empty((2, 0), dtype=dtype)  # the current document's tokens not yet in a row, and one before
        self.padding = 0

    def add(self, piece: np.ndarray, first: bool = True, last: bool = True) -> np.ndarray:
        """The rows that `piece` (a document, or the part of one that `first` and `last` describe) completes."""
        stream = np.concatenate([self.pending, piece.astype(self.dtype)], axis=1)
        step, length = self.width - 1, stream.shape[1]
        if last:
            starts = range(0, max(length - 1, 1), step)  # a one-token document still gets a row
            self.pending = np.empty((2, 0), dtype=self.dtype)
        else:  # the rows that are full now; the next one starts at the last token of the last one
            starts = range(0, (length - 1) // step * step, step)
            self.pending = stream[:, len(starts) * step :]
        rows = [stream[:, start : start + self.width] for start in starts]
        self.padding += sum(self.width - row.shape[1] for row in rows)
        if not rows:
            return np.empty((0, 2, self.width), self.dtype)
        return np.stack([pad_row(row, self.width, self.pad_id) for row in rows])

    def finish(self) -> np.ndarray:
        return np.empty((0, 2, self.width), self.dtype)


def pad_row(row: np.ndarray, width: int, pad_id: int) -> np.ndarray:
    """A [2, <= width] piece filled to [2, width]: PAD tokens with mask 0."""
    fill = width - row.shape[1]
    padding = np.array([[pad_id], [0]], dtype=row.dtype).repeat(fill, axis=1)
    return np.concatenate([row, padding], axis=1)


def rows_of_document(length: int, width: int) -> int:
    """How many rows `document` packing gives a document of `length` tokens."""
    return max(1, -(-(length - 1) // (width - 1)))
