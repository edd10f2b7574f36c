"""Sequence parallelism on the ranks of a torchrun job, next to the same step computed whole on
rank 0 (tests/model/test_sequence_parallel.py).

Usage (torchrun --nproc_per_node N tests/helpers/sequence_parallel_worker.py ...):
    ... grads OUT.json SCHEME...
    ... memory OUT.json LENGTH

grads: for each scheme, a float32 model (GQA, rows of packed documents that straddle the slice
boundaries) computes the loss of one batch on N ranks, each holding 1/N of the tokens; the
gradients are summed over the ranks (what DeepSpeed's reduction does with the loss scaling of
launch.train). Rank 0 then computes the same loss and gradients with the whole sequence and
writes, per scheme, the relative differences of the loss and of the worst parameter gradient.

memory: one training step of configs/tiny.yaml's model at LENGTH tokens, on N ranks and then
whole on rank 0: the bytes autograd saves for the backward on each rank, and the largest tensor
any op makes in the forward and backward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sequence_parallel import saved_for_backward
from model import ModelConfig, Transformer
from model.sequence_parallel import SequenceParallel
from training.distributed import exit_process

T = 48


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, targets, doc_ids [2, T]: documents cross every boundary of 2, 3 or 4 slices."""
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, 97, (2, T + 1), generator=gen)
    doc_ids = torch.tensor([[0] * 5 + [1] * 30 + [2] * 13, [0] * 17 + [1] * 2 + [2] * 29])
    return text[:, :-1], text[:, 1:], doc_ids


def loss_and_gradients(model: Transformer) -> tuple[float, dict[str, torch.Tensor]]:
    """Sum of the rank's cross entropies over the sequence's target count, and its gradients."""
    tokens, targets, doc_ids = batch()
    model.zero_grad()
    total, _ = model(tokens, doc_ids, targets=targets)  # this rank's tokens' sum
    loss = total / (targets != -100).sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def gradients(sp: SequenceParallel, schemes: list[str]) -> dict:
    """Per scheme: relative differences of the loss and worst gradient to the whole sequence's
    (on rank 0; empty elsewhere)."""
    rank = sp.rank
    report = {}
    for scheme in schemes:
        cfg = ModelConfig(
            scheme=scheme, vocab_size=97, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4,
            window=20, attn_block=8,
        )  # fmt: skip
        torch.manual_seed(0)
        model = Transformer(cfg, train_length=T)
        with torch.no_grad():  # off their initial values: learned angles, PaTH, biases act
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.sequence_parallel = sp
        loss, grads = loss_and_gradients(model)
        loss = torch.tensor(loss)
        torch.distributed.all_reduce(loss)
        for g in grads.values():
            torch.distributed.all_reduce(g)
        if rank == 0:
            model.sequence_parallel = None
            whole_loss, whole = loss_and_gradients(model)
            worst = max(
                ((grads[n] - g).norm() / g.norm().clamp(min=1e-30)).item() for n, g in whole.items()
            )
            report[scheme] = {
                "loss": whole_loss,
                "loss_rel": abs(loss.item() - whole_loss) / whole_loss,
                "grad_rel": worst,
            }
    return report


class LargestTensor(TorchDispatchMode):
    """The element count of the largest tensor any op makes."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def training_step_memory(model: Transformer, length: int) -> dict:
    """Bytes saved for the backward and the largest tensor of one step on packed documents."""
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(0, model.cfg.vocab_size, (1, length + 1), generator=gen)
    doc_ids = (torch.arange(length) * 7 // length)[None]  # 7 documents
    recorder = LargestTensor()
    with recorder, saved_for_backward() as saved:
        total, _ = model(text[:, :-1], doc_ids, targets=text[:, 1:])
    with recorder:
        total.backward()
    return {"saved_bytes": saved[0], "largest_numel": recorder.largest}


def memory(sp: SequenceParallel, length: int) -> dict:
    from training.config import load_config

    torch.manual_seed(0)
    model = Transformer(load_config("configs/tiny.yaml").model, train_length=128)
    model.sequence_parallel = sp
    report = {"vocab_size": model.cfg.vocab_size, "parallel": training_step_memory(model, length)}
    if sp.rank == 0:
        model.sequence_parallel = None
        report["whole"] = training_step_memory(model, length)
    return report


def main(mode: str, out: str, rest: list[str]) -> None:
    import deepspeed

    deepspeed.init_distributed("gloo", verbose=False)
    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sp = SequenceParallel(torch.distributed.group.WORLD, size, rank)
    report = gradients(sp, rest) if mode == "grads" else memory(sp, int(rest[0]))
    if rank == 0:
        Path(out).write_text(json.dumps(report, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    exit_process(0)
