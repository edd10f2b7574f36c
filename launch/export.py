"""Consolidated weights of a checkpoint:
`python -m launch.export RUN_DIR [--step N] [--out DIR] [--hf | --llama]`.

Checks the checkpoint's files against their sha256, gathers the ZeRO partitions with DeepSpeed's
zero_to_fp32 API (on the CPU, no process group), then writes `model.safetensors` and
`config.json` (the model config, the trained length, the step, the tokenizer's sha256) into
`RUN_DIR/export/step_<N>/` unless --out names another directory.
`load_exported(DIR)` gives the model back. With --hf, a Hugging Face transformers model
(`model.hf.convert.write_hf`, every scheme; default `RUN_DIR/export/hf_step_<N>/`); with --llama, a
rope or nope model as transformers' own LlamaForCausalLM (default `.../llama_step_<N>/`). A
Hugging Face export also holds `rotalibi_export.json`, written last: the checkpoint it came
from, the sha256 of that checkpoint's manifest and of the exported weights
(`export_source_problem` checks an export against a checkpoint).

A checkpoint whose weights are not finite (saved after training diverged) is refused, naming
the newest with finite weights, whether asked for by --step or as the newest; so is an --out
that is not a directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.hf import convert as hf
from training.export import ExportError, check_out, export, export_hf, pick_checkpoint


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
        if args.out is not None:
            check_out(args.out)
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
