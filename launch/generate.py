"""Text from a trained model: `python -m launch.generate RUN --prompt TEXT [--step N]
[--max-new-tokens 128] [--temperature 0.8] [--top-p 0.95] [--seed 0]`.

Loads the run's newest complete checkpoint (or --step), consolidated and verified as
`launch.export` does, with the tokenizer it was trained with, and decodes incrementally
(`Transformer.decode`: a KV cache, so each new token costs O(context), not a forward over the
whole text). Sampling is seeded: temperature, then nucleus (top-p) truncation; temperature 0 is
greedy. A progress line goes to stderr; the prompt and its continuation to stdout. Generation
stops at the end-of-text token or after --max-new-tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from data.tokenizer import eos_id, read_tokenizer_file
from model import Transformer
from model.hf.convert import HFExportError, tokenizer_file
from training.export import ExportError, model_from_checkpoint, pick_checkpoint


def next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """A token drawn from softmax(logits / temperature), restricted to the smallest set of the
    likeliest tokens whose mass reaches top_p; the argmax when temperature is 0."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < top_p  # the first token always stays
    kept = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(kept, 1, generator=generator))


def sample(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: int | None = None,
    progress: bool = False,
) -> list[int]:
    """Up to max_new_tokens tokens after `prompt`, decoded with a KV cache; ends after `stop`."""
    from model.decoding import DecodingCache

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    cache = DecodingCache(model.cfg.n_layers)
    logits = model.decode(torch.tensor([prompt], device=device), cache)[0, -1]
    new: list[int] = []
    with tqdm(total=max_new_tokens, desc="generate", unit="tok", disable=not progress) as bar:
        while True:
            new.append(next_token(logits.cpu(), temperature, top_p, generator))
            bar.update()
            if new[-1] == stop or len(new) == max_new_tokens:
                return new
            logits = model.decode(torch.tensor([new[-1:]], device=device), cache)[0, -1]


# The smallest sampling temperature: logits / temperature must stay finite in float64 for any
# finite float32 logit (|logit| < 3.5e38); below it sampling is greedy in all but name.
MIN_TEMPERATURE = 1e-6


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line: `error: ...`, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def _undecodable(text: str) -> str:
    """What lone surrogates in argv stand for: the bytes that were not UTF-8 (Python's
    surrogate escapes), else the code points."""
    try:
        return "bytes " + text.encode("utf-8", "surrogateescape").hex(" ")
    except UnicodeEncodeError:
        return "code points " + " ".join(f"U+{ord(c):04X}" for c in text)


def _options(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="python -m launch.generate", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        parser.error(f"--temperature must be a finite number >= 0 (got {args.temperature})")
    if 0 < args.temperature < MIN_TEMPERATURE:
        parser.error(
            f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g} "
            f"(got {args.temperature:g})"
        )
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1] (got {args.top_p})")
    if not args.prompt:
        parser.error("--prompt is empty: give the text to continue")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that were not UTF-8, as surrogate escapes
        parser.error(
            f"--prompt is not valid UTF-8 ({_undecodable(args.prompt[e.start : e.end])} at "
            f"character {e.start}): give text in UTF-8"
        )
    return args


def main(argv: list[str]) -> int:
    args = _options(argv)
    try:
        checkpoint = pick_checkpoint(args.run_dir, args.step)
        with contextlib.redirect_stdout(
            sys.stderr
        ):  # DeepSpeed's loading chatter: stdout is the text
            model, config = model_from_checkpoint(checkpoint)
        tokenizer = read_tokenizer_file(
            tokenizer_file(config["data"]["path"], checkpoint.manifest["tokenizer_sha256"])
        )
    except (ExportError, HFExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    prompt = tokenizer.encode(args.prompt).ids
    new = sample(
        model,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=eos_id(tokenizer),
        progress=True,
    )
    print(tokenizer.decode(prompt + new, skip_special_tokens=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
