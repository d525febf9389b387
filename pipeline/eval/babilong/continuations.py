"""What a model does after a BABILong prompt, read once: greedy decoding, and the forced choice among the task's
answer words. Each continues its own copy of the prompt's cache (LM2Cache for LM2, transformers' DynamicCache for
vanilla; copy.deepcopy copies either, also from folders exported before this module existed), so a 16k-token prompt
is read once per sample, not once per candidate and again for the answer.

The forced choice scores each candidate word w by log p(" " + w | prompt), the sum over its tokens' log-probabilities
(a multi-token word is one continuation), and picks the highest: whether the model knows the answer, apart from what
greedy decoding makes of it (a newline, a repeated word). Sums, not means: a mean per token would favour long words
whose later tokens follow almost surely from the first.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from lm2.model.errors import EvalError


@dataclass
class PromptState:
    """A model just after reading a prompt."""

    logits: torch.Tensor
    """[vocab] the next token's logits."""
    cache: object
    """The model's cache after the prompt; never continued itself (continuations copy it)."""


def read_prompt(model: torch.nn.Module, ids: list[int]) -> PromptState:
    """One forward over the prompt; only its last position is projected onto the vocabulary."""
    tokens = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model(tokens, use_cache=True, logits_to_keep=1)
    return PromptState(out.logits[0, -1], out.past_key_values)


def _step(model: torch.nn.Module, tokens: list[int], cache: object) -> torch.Tensor:
    """Feeds tokens after what `cache` holds (which it updates): their logits [len(tokens), vocab]."""
    with torch.no_grad():
        out = model(torch.tensor([tokens], device=model.device), past_key_values=cache, use_cache=True)
    return out.logits[0]


def greedy(model: torch.nn.Module, state: PromptState, max_new_tokens: int, stop: set[int]) -> list[int]:
    """The greedy continuation, as generate(do_sample=False) gives it: up to max_new_tokens tokens, ending with the
    first stop token (EOS) if one comes."""
    cache, logits, tokens = copy.deepcopy(state.cache), state.logits, []
    while True:
        tokens.append(int(logits.argmax()))
        if tokens[-1] in stop or len(tokens) == max_new_tokens:
            return tokens
        logits = _step(model, tokens[-1:], cache)[-1]


def candidate_ids(encode: Callable[[str], list[int]], text: str, ids: list[int], words: Iterable[str]):
    """{word: its tokens after the prompt}: the tokens of text + " " + word beyond the prompt's own, so the word is
    tokenized as it would continue this prompt. EvalError if the tokenizer changes the prompt's tokens at the seam."""
    candidates = {}
    for word in words:
        full = encode(f"{text} {word}")
        if full[: len(ids)] != ids or len(full) == len(ids):
            raise EvalError(
                f"the tokenizer merges the prompt's last token with the answer {word!r}: the forced choice needs "
                "prompts that end where a word starts (the prompt format ends with 'Answer:')"
            )
        candidates[word] = full[len(ids) :]
    return candidates


def forced_choice(model: torch.nn.Module, state: PromptState, candidates: dict[str, list[int]]) -> dict[str, float]:
    """{word: log p(its tokens | prompt)} (nats); the choice is the highest (the first listed on a tie)."""
    first = torch.log_softmax(state.logits.float(), -1)
    scores = {}
    for word, ids in candidates.items():
        score = first[ids[0]]
        if len(ids) > 1:
            rest = torch.log_softmax(_step(model, ids[:-1], copy.deepcopy(state.cache)).float(), -1)
            score = score + rest[torch.arange(len(ids) - 1), ids[1:]].sum()
        scores[word] = float(score)
    return scores


def chosen(scores: dict[str, float]) -> str:
    return max(scores, key=scores.__getitem__)
