"""Cached decoding against a full forward: one new token at a given context, both measured in
this run, for rotalibi's model (`Transformer.decode`) and its Hugging Face export.

    python -m bench.generate [CONFIG] [--context 2048] [--repeats 5]

The model is CONFIG's (default configs/tiny.yaml, hybrid) at initialisation; its weights do not
change the cost. full: a forward over context + 1 tokens (what decoding without a cache costs
per token). cached: the same token through the cache after a prefill of the context. The
issue asks for cached at least 20x faster than full at context 2048. Prints a table and writes
bench/results/generate_<machine>.json.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

import torch

from bench import median_seconds, write_result
from model import Transformer
from model.decoding import DecodingCache
from model.hf.convert import to_hf
from model.hf.modeling_rotalibi import RotalibiForCausalLM
from training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_SPEEDUP = 20


@torch.no_grad()
def rotalibi_times(model: Transformer, tokens: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(full forward, cached step) seconds for the last token of `tokens`."""
    cache = DecodingCache(model.cfg.n_layers)
    model.decode(tokens[:, :-1], cache)

    def cached_step() -> None:
        model.decode(tokens[:, -1:], copy.deepcopy(cache))

    copying = median_seconds(lambda: copy.deepcopy(cache), repeats)
    full = median_seconds(lambda: model(tokens), repeats)
    return full, median_seconds(cached_step, repeats) - copying


@torch.no_grad()
def hf_times(model: RotalibiForCausalLM, tokens: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(full forward, cached step) seconds of the Hugging Face model."""
    cache = model(tokens[:, :-1], use_cache=True).past_key_values

    def cached_step() -> None:
        model(tokens[:, -1:], past_key_values=copy.deepcopy(cache), use_cache=True)

    copying = median_seconds(lambda: copy.deepcopy(cache), repeats)
    full = median_seconds(lambda: model(tokens, use_cache=False), repeats)
    return full, median_seconds(cached_step, repeats) - copying


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__)
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    torch.manual_seed(0)
    model = Transformer(cfg.model, train_length=cfg.data.seq_len).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (1, args.context + 1))
    hf_model = to_hf(model, cfg.data.seq_len, eos=0)
    rows = {
        "rotalibi": rotalibi_times(model, tokens, args.repeats),
        "hf": hf_times(hf_model.eval(), tokens, args.repeats),
    }
    result = {
        "machine": platform.node(),
        "config": args.config,
        "scheme": cfg.model.scheme,
        "context": args.context,
        "threads": torch.get_num_threads(),
        "required_speedup": REQUIRED_SPEEDUP,
        "models": {
            name: {"full_s": full, "cached_s": cached, "speedup": full / cached}
            for name, (full, cached) in rows.items()
        },
    }
    print(f"context {args.context}, {cfg.model.scheme}: one token")
    print(f"{'model':10} {'full forward':>14} {'cached step':>13} {'speed-up':>9}")
    for name, row in result["models"].items():
        print(f"{name:10} {row['full_s']:13.4f}s {row['cached_s']:12.5f}s {row['speedup']:8.1f}x")
    write_result("generate", result)
    return 0 if all(r["speedup"] >= REQUIRED_SPEEDUP for r in result["models"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
