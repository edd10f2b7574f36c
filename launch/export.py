"""Consolidated weights of a checkpoint:
`python -m launch.export RUN_DIR [--step N] [--out DIR] [--hf | --llama]`.

Checks the checkpoint's files against their sha256, gathers the ZeRO partitions with DeepSpeed's
zero_to_fp32 API (on the CPU, no process group), then writes `model.safetensors` and
`config.json` (the model config, the trained length, the step, the tokenizer's sha256) into
`RUN_DIR/export/step_<N>/` unless --out names another directory.
`load_exported(DIR)` gives the model back. With --hf, a Hugging Face transformers model
(`launch.hf.write_hf`, every scheme; default `RUN_DIR/export/hf_step_<N>/`); with --llama, a
rope or nope model as transformers' own LlamaForCausalLM (default `.../llama_step_<N>/`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import yaml
from safetensors.torch import load_model, save_model

from launch import checkpoint as ckpt
from launch import hf
from model import ModelConfig, Transformer


class ExportError(ValueError):
    """No checkpoint to export, or no export to load."""


def pick_checkpoint(run_dir: Path, step: int | None) -> ckpt.Checkpoint:
    """The newest complete checkpoint of `run_dir`, or the one of `step`."""
    if not Path(run_dir).is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    found = ckpt.find_checkpoints(Path(run_dir) / "checkpoints")
    if not found:
        raise ExportError(f"{run_dir} holds no complete checkpoint (looked in checkpoints/)")
    if step is None:
        return found[-1]
    for checkpoint in found:
        if checkpoint.step == step:
            return checkpoint
    steps = ", ".join(str(c.step) for c in found)
    raise ExportError(f"{run_dir} has no complete checkpoint of step {step}; it has {steps}")


def model_from_checkpoint(checkpoint: ckpt.Checkpoint) -> tuple[Transformer, dict]:
    """The consolidated float32 model of a checkpoint, and the run's config as a dict."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    problem = ckpt.verify(checkpoint)
    if problem is not None:
        raise ExportError(f"checkpoint {checkpoint.path} is corrupted: {problem}")
    config = yaml.safe_load(checkpoint.manifest["config"])
    model = Transformer(ModelConfig(**config["model"]), train_length=config["data"]["seq_len"])
    state = get_fp32_state_dict_from_zero_checkpoint(
        str(checkpoint.path.parent), tag=checkpoint.path.name
    )
    model.load_state_dict(state, strict=True)
    return model, config


def export(checkpoint: ckpt.Checkpoint, out: Path) -> Path:
    """Write model.safetensors and config.json for `checkpoint` into `out`."""
    model, config = model_from_checkpoint(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    meta = {
        "model": asdict(model.cfg),
        "train_length": config["data"]["seq_len"],
        "data_path": config["data"]["path"],  # the dataset it was trained (and is evaluated) on
        "step": checkpoint.step,
        "tokens": checkpoint.manifest["tokens"],
        "tokenizer_sha256": checkpoint.manifest["tokenizer_sha256"],
        "source": str(checkpoint.path),
    }
    (out / "config.json").write_text(json.dumps(meta, indent=1))
    return out


def export_hf(checkpoint: ckpt.Checkpoint, out: Path, *, llama: bool = False) -> Path:
    """Write `checkpoint` as a Hugging Face model into `out` (`launch.hf`)."""
    config = yaml.safe_load(checkpoint.manifest["config"])
    if llama:
        hf.check_llama(config["model"].get("scheme", ModelConfig.scheme))
    tokenizer = hf.tokenizer_file(config["data"]["path"], checkpoint.manifest["tokenizer_sha256"])
    model, _ = model_from_checkpoint(checkpoint)
    write = hf.write_llama if llama else hf.write_hf
    return write(model, config["data"]["seq_len"], tokenizer, out)


def load_exported(directory: str | Path) -> tuple[Transformer, dict]:
    """The model of an export directory (in eval mode) and its config.json."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ExportError(f"{directory} is not an export (no config.json); run launch.export")
    meta = json.loads((directory / "config.json").read_text())
    model = Transformer(ModelConfig(**meta["model"]), train_length=meta["train_length"])
    load_model(model, str(directory / "model.safetensors"))
    return model.eval(), meta


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    parser.add_argument("--out", type=Path, help="default: RUN_DIR/export/[hf_|llama_]step_<N>")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--hf", action="store_true", help="a transformers model (remote code)")
    form.add_argument("--llama", action="store_true", help="rope/nope as LlamaForCausalLM")
    args = parser.parse_args(argv)
    prefix = "hf_" if args.hf else "llama_" if args.llama else ""
    try:
        checkpoint = pick_checkpoint(args.run_dir, args.step)
        out = args.out or args.run_dir / "export" / f"{prefix}{checkpoint.path.name}"
        if args.hf or args.llama:
            export_hf(checkpoint, out, llama=args.llama)
        else:
            export(checkpoint, out)
    except (ExportError, hf.HFExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {checkpoint.path} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
