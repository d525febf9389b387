"""A thin sentencepiece wrapper: train a model, load it, and name it by the sha256 of its .model file.

Training follows Llama's sentencepiece recipe: identity normalization and no whitespace collapsing, so text
round-trips exactly, and byte fallback, so no character is ever <unk> (newlines become <0x0A>).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import sentencepiece as spm

from lm2.model.errors import DataError
from lm2.pipeline.data.sources import Chunk
from lm2.pipeline.files import sha256_file, write_atomic

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
# sentencepiece drops longer training sentences; documents are fed line by line, and long lines are cut.
_MAX_SENTENCE_CHARS = 4096
# Above this many lines sentencepiece trains on a random sample, keeping training memory bounded.
_MAX_TRAINING_SENTENCES = 5_000_000


@dataclass(frozen=True)
class Tokenizer:
    """A loaded sentencepiece model and the facts the data pipeline records about it."""

    path: Path
    processor: spm.SentencePieceProcessor
    checksum: str
    """sha256 of the .model file: shards and checkpoints name their tokenizer by it."""

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer {path} does not exist: train one with `lm2 data tokenizer`")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(str(path))
        except (OSError, RuntimeError) as error:
            raise DataError(
                f"{path} is not a sentencepiece model ({error}); retrain it with `lm2 data tokenizer`"
            ) from None
        if processor.eos_id() < 0 or processor.pad_id() < 0:
            raise DataError(
                f"tokenizer {path} has no EOS or PAD id; lm2 needs both: retrain it with `lm2 data tokenizer`"
            )
        return cls(path=path, processor=processor, checksum=sha256_file(path))

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
        """Each document's tokens followed by EOS (one thread: callers parallelise over processes)."""
        return [np.array([*ids, self.eos_id], dtype=np.int64) for ids in self.processor.encode(texts, num_threads=1)]

    def encode_chunks(self, chunks: list[Chunk]) -> list[np.ndarray]:
        """Each chunk's tokens, followed by EOS where it ends its document: the tokens of the whole document, as
        long as a chunk starts after a newline or before a word (sources._cut). A chunk that continues a document
        is encoded without sentencepiece's leading-space prefix, which only a document's start gets."""
        encoded = []
        for chunk in chunks:
            processor = self.processor if chunk.first else self._continuation
            ids = processor.encode(chunk.text, num_threads=1)
            encoded.append(np.array([*ids, self.eos_id] if chunk.last else ids, dtype=np.int64))
        return encoded

    @cached_property
    def _continuation(self) -> spm.SentencePieceProcessor:
        """This model without the leading-space prefix (add_dummy_prefix off), loaded on first use."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.path.read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False
        processor = spm.SentencePieceProcessor()
        processor.LoadFromSerializedProto(proto.SerializeToString())
        return processor

    def describe(self) -> dict:
        """What shard metadata records about the tokenizer."""
        return {
            "file": self.path.name,
            "sha256": self.checksum,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }


def _training_sentences(documents: Iterable[str], counter: list[int]) -> Iterator[str]:
    for document in documents:
        counter[0] += 1
        for line in document.splitlines():
            if line.strip():
                yield line[:_MAX_SENTENCE_CHARS]


def train_tokenizer(
    documents: Iterable[str], output: str | Path, vocab_size: int, model_type: str = "bpe"
) -> Tokenizer:
    """Trains a sentencepiece model on `documents` and writes it to `output` (atomically).

    Args:
        documents: texts, e.g. `sources.read_all(files)`.
        output: the .model file to write; its parent folder is created.
        vocab_size: pieces including the 4 specials (unk=0, bos=1, eos=2, pad=3) and 256 byte pieces.
        model_type: "bpe" or "unigram".
    """
    if model_type not in MODEL_TYPES:
        raise DataError(f"tokenizer type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    if vocab_size < 300:
        raise DataError(
            f"vocabulary size {vocab_size} is too small: 260 ids go to specials and bytes; use at least 300"
        )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    model = _SpmBytes()
    documents_seen = [0]
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(documents, documents_seen),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=4 * _MAX_SENTENCE_CHARS,
            input_sentence_size=_MAX_TRAINING_SENTENCES,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as error:
        if not documents_seen[0]:
            raise DataError("no documents to train the tokenizer on: the inputs are empty") from None
        raise DataError(
            f"sentencepiece could not train a {vocab_size}-piece {model_type} model: {error}. "
            "Lower --vocab-size or give more text."
        ) from None
    write_atomic(output, model.data)
    return Tokenizer.load(output)


class _SpmBytes:
    """sentencepiece's model_writer: collects the serialized model so it can be written atomically."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data
