"""`launch.train` fed fixed global batches instead of a dataset, for rank-count comparisons.

Usage (any launcher):
    python tests/helpers/train_on_fixed_batches.py GLOBAL_BATCH CONFIG [key=value ...]

Step s's global batch is GLOBAL_BATCH seeded random sequences; data-parallel rank r trains on
its contiguous slice, so 1 rank x 8 sequences and 2 ranks x 4 sequences see the same data (the
ranks of a sequence-parallel group share theirs). An extra argument
`nan_steps=6,7` makes the loss of those steps (1-based) NaN on every rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class FixedBatches:
    tokenizer_sha256 = "none: fixed random batches"

    def __init__(
        self, global_batch: int, seq_len: int, batch_size: int, vocab: int, sequence_parallel: int
    ):
        self.rank = int(os.environ["RANK"]) // sequence_parallel
        self.world = int(os.environ["WORLD_SIZE"]) // sequence_parallel
        if global_batch != batch_size * self.world:
            raise SystemExit(f"global batch {global_batch} != {batch_size} x {self.world} ranks")
        self.global_batch, self.seq_len, self.batch_size = global_batch, seq_len, batch_size
        self.vocab = vocab
        self.step = 0

    def __iter__(self):
        while True:
            gen = torch.Generator().manual_seed(self.step)
            shape = (self.global_batch, self.seq_len + 1)
            full = torch.randint(0, self.vocab, shape, generator=gen)
            self.step += 1
            mine = full[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            yield {
                "tokens": mine[:, :-1],
                "targets": mine[:, 1:],
                "doc_ids": None,
                "documents": self.batch_size,  # one random sequence a row
            }

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]

    def close(self) -> None:
        pass  # nothing to free: the batches are generated


class _Vocab:
    def get_vocab_size(self) -> int:
        return 64


def main(argv: list[str]) -> int:
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher's
    nan_steps = {int(s) for a in argv if a.startswith("nan_steps=") for s in a[10:].split(",")}
    global_batch, rest = int(argv[0]), [a for a in argv[1:] if not a.startswith("nan_steps=")]
    # Stand-ins for the dataset functions that launch.train and the Trainer call, set on the
    # real modules before anything imports them by name.
    import data.loader
    import data.tokenizer

    data.tokenizer.load_tokenizer = lambda path: _Vocab()
    data.loader.build_train_loader = lambda cfg, *, seq_len, batch_size, seed, sequence_parallel: (
        FixedBatches(global_batch, seq_len, batch_size, 64, sequence_parallel)
    )
    import launch.train
    import training.trainer

    real_loss = training.trainer.Trainer._loss

    def poisoned_loss(trainer, batch):
        loss = real_loss(trainer, batch)
        return loss * float("nan") if trainer.step + 1 in nan_steps else loss

    training.trainer.Trainer._loss = poisoned_loss
    return launch.train.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
