"""A run's checkpoint as a model: consolidated weights (files checked against their sha256,
ZeRO partitions gathered, non-finite weights refused), `export` (model.safetensors and
config.json), `export_hf` (a Hugging Face directory, model/hf/convert.py, with its provenance
record) and `load_exported`. `python -m launch.export` (launch/export.py) is the command line.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_model

from model import ModelConfig, Transformer
from model.hf import convert as hf
from training import checkpoint as ckpt


class ExportError(ValueError):
    """No checkpoint to export, or no export to load."""


EXPORT_RECORD = "rotalibi_export.json"  # in a Hugging Face export: where it came from


def pick_checkpoint(run_dir: Path, step: int | None) -> ckpt.Checkpoint:
    """The newest complete checkpoint of `run_dir`, or the one of `step`."""
    if not Path(run_dir).is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    found = ckpt.find_checkpoints(Path(run_dir) / "checkpoints")
    if not found:
        raise ExportError(f"{run_dir} holds no complete checkpoint (looked in checkpoints/)")
    chosen = found[-1] if step is None else next((c for c in found if c.step == step), None)
    if chosen is None:
        steps = ", ".join(str(c.step) for c in found)
        raise ExportError(f"{run_dir} has no complete checkpoint of step {step}; it has {steps}")
    if (problem := ckpt.non_finite_problem(chosen)) is not None:
        raise ExportError(problem)
    return chosen


def model_from_checkpoint(checkpoint: ckpt.Checkpoint) -> tuple[Transformer, dict]:
    """The consolidated float32 model of a checkpoint, and the run's config as a dict.
    ExportError when its files are not the ones saved or its weights are not finite."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if (problem := ckpt.non_finite_problem(checkpoint)) is not None:
        raise ExportError(problem)
    problem = ckpt.verify(checkpoint)
    if problem is not None:
        raise ExportError(f"checkpoint {checkpoint.path} is corrupted: {problem}")
    config = yaml.safe_load(checkpoint.manifest["config"])
    model = Transformer(ModelConfig(**config["model"]), train_length=config["data"]["seq_len"])
    state = get_fp32_state_dict_from_zero_checkpoint(
        str(checkpoint.path.parent), tag=checkpoint.path.name
    )
    model.load_state_dict(state, strict=True)
    bad = [name for name, value in state.items() if not torch.isfinite(value).all()]
    if bad:  # a manifest that says otherwise (written by an older rotalibi, or altered)
        raise ExportError(
            f"checkpoint {checkpoint.path} holds non-finite weights ({bad[0]}); its manifest "
            "says they are finite"
        )
    return model, config


def check_out(out: Path) -> None:
    """ExportError unless `out` is a directory or can be made one (no file in the way)."""
    for path in (out, *out.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise ExportError(f"--out {out}: {path} is a file, not a directory")
            return


def export(checkpoint: ckpt.Checkpoint, out: Path) -> Path:
    """Write model.safetensors and config.json for `checkpoint` into `out`."""
    check_out(out)
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
        "source_manifest_sha256": ckpt.sha256(checkpoint.path / ckpt.MANIFEST),
    }
    (out / "config.json").write_text(json.dumps(meta, indent=1))
    return out


def export_hf(checkpoint: ckpt.Checkpoint, out: Path, *, llama: bool = False) -> Path:
    """Write `checkpoint` as a Hugging Face model into `out` (`model.hf.convert`), and last its
    record, EXPORT_RECORD (`export_source_problem`)."""
    check_out(out)
    config = yaml.safe_load(checkpoint.manifest["config"])
    if llama:
        hf.check_llama(config["model"].get("scheme", ModelConfig.scheme))
    tokenizer = hf.tokenizer_file(config["data"]["path"], checkpoint.manifest["tokenizer_sha256"])
    model, _ = model_from_checkpoint(checkpoint)
    (out / EXPORT_RECORD).unlink(missing_ok=True)
    write = hf.write_llama if llama else hf.write_hf
    write(model, config["data"]["seq_len"], tokenizer, out)
    record = {
        "source": str(checkpoint.path),
        "step": checkpoint.step,
        "manifest_sha256": ckpt.sha256(checkpoint.path / ckpt.MANIFEST),
        "weights_sha256": ckpt.sha256(out / "model.safetensors"),
    }
    ckpt.write_atomically(out / EXPORT_RECORD, json.dumps(record, indent=1))
    return out


def export_source_problem(checkpoint: ckpt.Checkpoint, out: Path) -> str | None:
    """Why the Hugging Face export `out` is not verifiably `checkpoint`'s (no record of where it
    came from, another checkpoint's manifest, weights altered since), or None."""
    try:
        record = json.loads((out / EXPORT_RECORD).read_text())
        manifest_sha256, weights_sha256 = record["manifest_sha256"], record["weights_sha256"]
    except FileNotFoundError:
        return f"it has no {EXPORT_RECORD} (written by an older rotalibi, or unfinished)"
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        return f"its {EXPORT_RECORD} is unreadable ({type(e).__name__}: {e})"
    try:
        if manifest_sha256 != ckpt.sha256(checkpoint.path / ckpt.MANIFEST):
            return f"it was exported from another checkpoint ({record.get('source')})"
        if weights_sha256 != ckpt.sha256(out / "model.safetensors"):
            return "its model.safetensors is not the one exported"
    except OSError as e:
        return f"cannot read it ({e})"
    return None


def load_exported(directory: str | Path) -> tuple[Transformer, dict]:
    """The model of an export directory (in eval mode) and its config.json."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ExportError(f"{directory} is not an export (no config.json); run launch.export")
    meta = json.loads((directory / "config.json").read_text())
    model = Transformer(ModelConfig(**meta["model"]), train_length=meta["train_length"])
    load_model(model, str(directory / "model.safetensors"))
    return model.eval(), meta
