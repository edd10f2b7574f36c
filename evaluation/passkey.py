"""Passkey retrieval prompts: a random number hidden at a chosen depth in filler text, then
asked for (after Mohtashami & Jaggi's landmark-attention test).

A prompt of L + 1 tokens is an instruction, filler, the needle ("The pass key is 71432 ...")
after `depth` of the filler (0: right after the instruction, 1: right before the question),
more filler, the question, and the answer. The model reads the first L tokens; it retrieves the
key when its greedy prediction of every answer token is right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass(frozen=True)
class Passkey:
    tokens: list[int]  # length + 1 ids: the prompt, then the answer
    answer: int  # how many of the last tokens are the answer


def passkey_key(seed: int, length: int, depth: float, trial: int) -> int:
    """The 5-digit key of one case: the same on every run, so that runs compare."""
    rng = np.random.default_rng([seed, length, round(depth * 10_000), trial])
    return int(rng.integers(10_000, 100_000))


def passkey_prompt(tokenizer: Tokenizer, length: int, depth: float, key: int) -> Passkey | None:
    """The case of `length` input tokens, or None when the fixed text alone is longer."""

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text).ids

    head, needle, question = ids(INSTRUCTION), ids(NEEDLE.format(key=key)), ids(QUESTION)
    answer = ids(ANSWER.format(key=key))
    room = length + 1 - len(head) - len(needle) - len(question) - len(answer)
    if room < 0:
        return None
    sentence = ids(FILLER)
    filler = (sentence * (room // len(sentence) + 1))[:room]
    before = round(depth * room)
    tokens = head + filler[:before] + needle + filler[before:] + question + answer
    return Passkey(tokens, len(answer))
