"""Extrapolation evaluation: `python -m launch.evaluate TARGET [key=value ...]`.

    python -m launch.evaluate runs/tiny                      the newest checkpoint of a run
    python -m launch.evaluate runs/tiny --step 200           one checkpoint (or --all of them)
    python -m launch.evaluate runs/tiny/checkpoints/step_200 a checkpoint directory
    python -m launch.evaluate runs/tiny/export/step_300      an export (launch.export)
        [eval.lengths=[128,1024] eval.windows=4 data.path=... ...] [--out DIR] [--device cuda]
        [--force]

One process, on CUDA when there is a GPU, else the CPU; no DeepSpeed engine. Overrides take
`eval.*`, `data.path`, `model.attn_block` and `deepspeed.precision` keys on top of the run's
config (an export outside a run starts from the schema's defaults). Writes, like the
evaluation inside training (`checkpoint_hook`), `eval/step_<N>.json`, `eval/ppl_vs_length.png`
and TensorBoard scalars and image, into the run directory (or --out). launch/extrapolation.py
says what is measured. A checkpoint is evaluated only if its files are the ones saved (sha256)
and its weights finite (--all leaves the others out, named), on a dataset of the tokenizer it
was trained with; a finite perplexity already recorded is never
replaced by a non-finite one (a corrupted model) unless --force.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from data.manifest import DatasetError, read_manifest
from data.tokenizer import load_tokenizer
from launch import checkpoint as ckpt
from launch.config import Config, ConfigError, check_evaluation_overrides, load_config
from launch.distributed import World
from launch.engine import precision
from launch.extrapolation import Extrapolation, plan_lengths, scalars
from launch.metrics import TensorBoardTracker
from launch.plots import curve_of, ppl_vs_length
from model import Transformer

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from launch.train import Trainer

log = logging.getLogger("rotalibi")


class TargetError(ValueError):
    """The evaluation target is not a run, a checkpoint or an export (or not intact)."""


class ResultsError(ValueError):
    """A new evaluation would destroy a recorded result."""


# ---------------------------------------------------------------------- outputs


def load_results(eval_dir: Path) -> list[dict]:
    """Every `step_<N>.json` of an eval directory, by step."""
    found = [json.loads(p.read_text()) for p in eval_dir.glob("step_*.json")]
    return sorted(found, key=lambda r: r["step"])


PER_LENGTH = (
    "windows", "ppl", "ppl_beyond", "mixing_window", "far_mass", "entropy", "mass_by_distance",
    "passkey", "passkey_nll", "seconds",
)  # fmt: skip


def merged(old: dict, new: dict) -> dict:
    """An earlier evaluation of the same checkpoint on the same held-out text updated with a
    new one, length by length: e.g. a long length evaluated later on a bigger machine joins
    the lengths evaluated during training. On other text the new one replaces it."""
    same = ("step", "scheme", "train_length", "held_out")
    if any(old.get(key) != new[key] for key in same):
        log.warning(
            "replacing the evaluation of step %d: it was made on other held-out text or "
            "settings (%s, now %s)", new["step"], old.get("held_out"), new["held_out"],
        )  # fmt: skip
        return new
    result = {**old, **new}
    for key in PER_LENGTH:
        result[key] = {**old.get(key, {}), **new[key]}
    evaluated = {str(n) for n in new["lengths"]}
    evaluated |= {f"passkey@{n}" for n in evaluated}
    kept = {k: v for k, v in old.get("skipped", {}).items() if k not in evaluated}
    result["skipped"] = {**kept, **new["skipped"]}
    result["lengths"] = sorted(set(old["lengths"]) | set(new["lengths"]))
    if old.get("receptive_field") and new["receptive_field"]:
        at_length = {**old["receptive_field"]["at_length"], **new["receptive_field"]["at_length"]}
        result["receptive_field"] = {**new["receptive_field"], "at_length": at_length}
    return result


def _lost_finite_results(old: dict, new: dict) -> list[str]:
    """The lengths whose finite perplexity in `old` is not finite in `new`."""

    def finite(value: object) -> bool:
        return isinstance(value, float | int) and math.isfinite(value)

    return [
        length
        for length, ppl in old.get("ppl", {}).items()
        if finite(ppl) and length in new["ppl"] and not finite(new["ppl"][length])
    ]


PLOT_TAG = "extrap/ppl_vs_length"  # the plot's name in TensorBoard and the other trackers


def write_outputs(results: dict, eval_dir: Path, *, force: bool = False) -> tuple[Path, Figure]:
    """step_<N>.json (merged into an earlier one of the same checkpoint) and the plot over
    every checkpoint evaluated so far (ppl_vs_length.png). Returns the JSON's path and the
    plot, for the trackers. ResultsError, before anything is written, when a recorded finite
    perplexity would become non-finite (unless `force`)."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    path = eval_dir / f"step_{results['step']}.json"
    if path.is_file():
        old = json.loads(path.read_text())
        results = merged(old, results)
        lost = _lost_finite_results(old, results)
        if lost and not force:
            raise ResultsError(
                f"{path} holds finite perplexities at lengths {', '.join(lost)} and this "
                "evaluation's are not finite (a corrupted or diverged model?); kept the old "
                "results: pass --force to replace them"
            )
    ckpt.write_atomically(path, json.dumps(results, indent=1))
    every = load_results(eval_dir)
    title = f"{results['scheme']}: perplexity by length ({eval_dir.parent.name})"
    curves = [curve_of(r, f"step {r['step']}") for r in every]
    figure = ppl_vs_length(curves, results["train_length"], title)
    figure.savefig(eval_dir / "ppl_vs_length.png", dpi=110)
    return path, figure


# ---------------------------------------------------------------------- inside training


def _zero3_gathered(params: list[torch.nn.Parameter]):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def evaluation_hook(cfg: Config) -> Callable[[Trainer, int], dict]:
    """`checkpoint_hook` for launch.train, once the evaluation settings of `cfg` are checked
    (ConfigError before any training otherwise)."""
    plan_lengths(cfg, cfg.data.seq_len)
    return checkpoint_hook


def checkpoint_hook(trainer: Trainer, step: int) -> dict:
    """launch.train's CheckpointHook: evaluate the checkpoint just saved, on every rank (each
    on its share of the windows, ZeRO-3 gathering the weights in the engine's forward); rank
    0 writes the outputs. Returns the scalars and (rank 0) the plot for the metrics. A failure
    is logged, and training goes on (the checkpoint is saved; `launch.evaluate` can redo it)."""
    cfg, module = trainer.cfg, trainer.engine.module
    was_training = module.training
    module.eval()
    try:
        evaluation = Extrapolation(
            module,
            cfg,
            trainer.world,
            train_length=cfg.data.seq_len,
            forward=lambda tokens: trainer.engine(tokens, None, head=False),
            gathered=_zero3_gathered,
        )
        results = evaluation.run(step=step, tokens=trainer.tokens)
        found = scalars(results)
        if trainer.world.is_main:
            found[PLOT_TAG] = write_outputs(results, cfg.run_dir / "eval")[1]
    except Exception:
        log.exception(
            "evaluation of step %d failed; training goes on. Redo it with "
            "`python -m launch.evaluate %s --step %d`",
            step,
            cfg.run_dir,
            step,
        )
        return {}
    finally:
        module.train(was_training)
    return found


# ---------------------------------------------------------------------- standalone


@dataclass(frozen=True)
class Target:
    """One model to evaluate: its step, how to build it (model, train length, tokens), and the
    sha256 of the tokenizer it was trained with."""

    step: int
    source: Path
    load: Callable[[], tuple[Transformer, int, int | None]]
    tokenizer_sha256: str


def check_tokenizer(targets: list[Target], data_path: str) -> None:
    """The held-out text must be tokenized as the models were trained: same tokenizer, by
    content (another tokenizer of the same size gives nonsense, not an error)."""
    found = read_manifest(data_path)["tokenizer_sha256"]
    for target in targets:
        if found != target.tokenizer_sha256:
            raise ConfigError(
                f"{target.source} was trained with tokenizer sha256 "
                f"{target.tokenizer_sha256[:12]}…, but data.path={data_path} has {found[:12]}…: "
                "evaluate on a dataset prepared with the model's tokenizer"
            )


def _config(yaml_text: str, origin: str, overrides: list[str], device: torch.device) -> Config:
    """The run's config (YAML text) with the evaluation's overrides, checked against the
    evaluation's needs before any model is loaded."""
    check_evaluation_overrides(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml_text)
        try:
            cfg = load_config(path, overrides)
        except ConfigError as e:
            raise ConfigError(str(e).replace(str(path), origin)) from None
    plan_lengths(cfg, cfg.data.seq_len)
    precision(cfg, device)
    vocab = load_tokenizer(cfg.data.path).get_vocab_size()
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer of {cfg.data.path} has {vocab} tokens, more than the model's "
            f"{cfg.model.vocab_size}: evaluate on the dataset the model was trained on "
            "(data.path=...)"
        )
    return cfg


def _checkpoint_target(checkpoint: ckpt.Checkpoint) -> Target:
    def load():
        from launch.export import model_from_checkpoint

        model, config = model_from_checkpoint(checkpoint)
        return model, config["data"]["seq_len"], checkpoint.manifest["tokens"]

    return Target(checkpoint.step, checkpoint.path, load, checkpoint.manifest["tokenizer_sha256"])


def resolve(target: Path, *, step: int | None, every: bool) -> tuple[str, Path, list[Target]]:
    """(the run's config as YAML, the directory outputs go to (the run's, or the target's
    outside a run), the models to evaluate)."""
    if not target.exists():
        raise TargetError(
            f"{target} does not exist; give a run directory, a checkpoint or an export"
        )
    if (target / ckpt.MANIFEST).is_file():  # one checkpoint
        if step is not None or every:
            raise TargetError("--step and --all take a run directory, not a checkpoint")
        found = [c for c in ckpt.find_checkpoints(target.parent) if c.path == target]
        if not found:
            raise TargetError(f"{target} is an incomplete checkpoint (see the warning above)")
        if (problem := ckpt.non_finite_problem(found[0])) is not None:
            raise TargetError(problem)
        run_dir = target.parent.parent
        if not (run_dir / "config.yaml").is_file():
            run_dir = target  # a checkpoint outside its run
        return found[0].manifest["config"], run_dir, [_checkpoint_target(found[0])]
    if (target / "config.json").is_file():  # an export
        if step is not None or every:
            raise TargetError("--step and --all take a run directory, not an export")
        from launch.export import load_exported

        meta = json.loads((target / "config.json").read_text())
        if "tokenizer_sha256" not in meta:
            raise TargetError(
                f"{target} was exported by an older rotalibi (no tokenizer sha256 to check the "
                "evaluation's dataset against); export it again with launch.export"
            )
        run_dir = target.parent.parent
        run_config = run_dir / "config.yaml"
        if run_config.is_file():
            yaml_text = run_config.read_text()
        else:  # an export outside its run: its model, trained length and dataset
            data = {"seq_len": meta["train_length"], "path": meta["data_path"]}
            yaml_text = yaml.safe_dump({"model": meta["model"], "data": data})
            run_dir = target

        def load():
            model, meta = load_exported(target)
            return model, meta["train_length"], meta.get("tokens")

        return yaml_text, run_dir, [Target(meta["step"], target, load, meta["tokenizer_sha256"])]
    if (target / "checkpoints").is_dir() or (target / "config.yaml").is_file():  # a run
        from launch.export import pick_checkpoint

        if every:  # those with finite weights: the others are named and left out
            chosen = ckpt.find_checkpoints(target / "checkpoints")
            for checkpoint in chosen:
                if not checkpoint.manifest["finite"]:
                    log.warning("leaving out %s: its weights are not finite", checkpoint.path)
            chosen = [c for c in chosen if c.manifest["finite"]]
            if not chosen:
                raise TargetError(f"{target} holds no complete checkpoint with finite weights")
        else:
            chosen = [pick_checkpoint(target, step)]
        return chosen[-1].manifest["config"], target, [_checkpoint_target(c) for c in chosen]
    raise TargetError(
        f"{target} is not a run directory (config.yaml, checkpoints/), a checkpoint "
        f"({ckpt.MANIFEST}) or an export (config.json); e.g. runs/tiny"
    )


def evaluate(
    target: Target,
    cfg: Config,
    device: torch.device,
    out: Path,
    attn_block: int | None = None,
    force: bool = False,
) -> dict:
    """Evaluate one target in this process and write its outputs under `out` (attn_block: the
    blockwise attention's tile, if not the checkpoint's; force: replace finite results by
    non-finite ones)."""
    model, train_length, tokens = target.load()
    if attn_block is not None:
        model.cfg.attn_block = attn_block
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    model = model.to(device).eval()
    for p in model.parameters():  # as DeepSpeed trains: parameters cast, buffers kept
        p.data = p.data.to(dtype[precision(cfg, device)])
    world = World(rank=0, world_size=1, local_rank=0, device=device)
    log.info("evaluating %s (step %d) on %s", target.source, target.step, device)
    results = Extrapolation(model, cfg, world, train_length=train_length).run(
        step=target.step, tokens=tokens
    )
    path, figure = write_outputs(results, out / "eval", force=force)
    tensorboard = TensorBoardTracker(out / "tb")
    tensorboard.scalars(results["step"], scalars(results))
    tensorboard.figure(PLOT_TAG, figure, results["step"])
    tensorboard.close(0)
    log.info("wrote %s and %s", path, path.parent / "ppl_vs_length.png")
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", type=Path, help="run directory, checkpoint or export")
    parser.add_argument("overrides", nargs="*", help="key=value (eval.*, data.path, ...)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="a run's checkpoint (default: the newest)")
    which.add_argument("--all", action="store_true", help="every checkpoint of a run")
    parser.add_argument("--out", type=Path, help="write eval/ and tb/ here (default: the run)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    parser.add_argument(
        "--force", action="store_true", help="replace finite results by non-finite ones"
    )
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from launch.export import ExportError

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: this machine has no CUDA device; use --device cpu")
        yaml_text, run_dir, targets = resolve(args.target, step=args.step, every=args.all)
        cfg = _config(yaml_text, f"the config of {args.target}", args.overrides, device)
        block = (
            cfg.model.attn_block
            if any(o.startswith("model.attn_block=") for o in args.overrides)
            else None
        )
        check_tokenizer(targets, cfg.data.path)
        for target in targets:
            evaluate(target, cfg, device, args.out or run_dir, block, args.force)
    except (TargetError, ExportError, ConfigError, DatasetError, ResultsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
