"""The extrapolation evaluation on a real dataset: perplexity against a plain forward pass and
at initialisation, diagnostics of ALiBi in closed form, skipped lengths, passkey prompts, the
evaluation inside a 2-rank ZeRO-3 training run against the standalone CLI, memory at 64 x 128
tokens, bad input, and the comparison of runs."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import EVAL_ARGS
from safetensors.torch import save_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data.manifest import read_manifest
from data.prepare import prepare
from data.tokenizer import load_tokenizer
from data.validation import validation_windows
from evaluation.extrapolation import Extrapolation, forward_bytes
from evaluation.passkey import passkey_key, passkey_prompt
from launch import compare, evaluate, export
from model import Transformer
from model.positions import alibi_slopes
from training import export as exports
from training.config import load_config
from training.distributed import World

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CPU = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SHORT = ["data.seq_len=32", "eval.lengths=[32,64]"]


def _config(dataset: Path, *overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [f"data.path={dataset}", *overrides])


def _model(cfg, seed: int = 0, perturb: float = 0.0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg.model, train_length=cfg.data.seq_len)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model.eval()


def _evaluate(model, cfg) -> dict:
    return Extrapolation(model, cfg, CPU, train_length=cfg.data.seq_len).run(step=0)


def test_perplexity_is_exp_of_the_mean_loss_of_a_plain_forward(stdlib_dataset):
    # 3 held-out windows of 64, cut into 6 of 32 at the trained length; batches of 2 windows.
    cfg = _config(stdlib_dataset, *SHORT, "eval.windows=3", "eval.batch_tokens=64")
    model = _model(cfg, perturb=0.05)
    results = _evaluate(model, cfg)
    assert results["windows"] == {"32": 6, "64": 3}
    held_out = validation_windows(str(stdlib_dataset), 64, 3, cfg.eval.seed)
    halves = torch.cat([held_out[:, :33], held_out[:, 32:]])  # the same tokens to predict
    for length, windows in ((32, halves), (64, held_out)):
        with torch.no_grad():
            logits = model(windows[:, :-1]).double()
        nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
        assert results["ppl"][str(length)] == pytest.approx(math.exp(nll.mean()), rel=1e-5)
        if length > 32:
            beyond = math.exp(nll[:, 32:].mean())
            assert results["ppl_beyond"][str(length)] == pytest.approx(beyond, rel=1e-5)
    assert "32" not in results["ppl_beyond"]  # no position lies beyond the trained length
    # Far from the uniform guess, so that a shifted target or a leaked future token would show.
    assert abs(math.log(results["ppl"]["32"] / cfg.model.vocab_size)) > 0.1


@pytest.mark.parametrize("scheme", ["hybrid", "alibi", "rope", "path"])
def test_perplexity_at_initialisation_is_about_the_vocabulary_size(stdlib_dataset, scheme):
    cfg = _config(stdlib_dataset, *SHORT, f"model.scheme={scheme}", "eval.windows=4")
    results = _evaluate(_model(cfg), cfg)
    vocab = cfg.model.vocab_size
    for length in ("32", "64"):
        assert vocab / 1.5 < results["ppl"][length] < vocab * 1.5
    # The passkey prompt's fixed text does not fit 32 or 64 tokens: said, not silently dropped.
    assert set(results["skipped"]) == {"passkey@32", "passkey@64"}
    if scheme == "path":
        assert "Householder" in results["unavailable"]["diagnostics"]
        assert results["mixing_window"] == {}
        assert "no distance bias" in results["unavailable"]["receptive_field"]
    else:
        assert set(results["mixing_window"]) == {"32", "64"}


def _truncated_geometric(r: float, i: int) -> list[float]:
    """Attention of query i over distances 0..i under ALiBi with q = k = 0."""
    return [r**n * (1 - r) / (1 - r ** (i + 1)) for n in range(i + 1)]


def test_alibi_diagnostics_with_zero_queries_and_keys_follow_the_closed_form(stdlib_dataset):
    cfg = _config(stdlib_dataset, *SHORT, "model.scheme=alibi", "eval.diagnostic_windows=2")
    model = _model(cfg, perturb=0.05)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.wq.weight.zero_()
            block.attn.wk.weight.zero_()
    results = _evaluate(model, cfg)
    for length in (32, 64):
        key = str(length)
        for h, m in enumerate(alibi_slopes(cfg.model.n_heads).tolist()):
            rows = [_truncated_geometric(math.exp(-m), i) for i in range(length)]
            mass = [sum(row[n] for row in rows if n < len(row)) / length for n in range(length)]
            entropy = -sum(p * math.log(p) for row in rows for p in row) / length
            cumulative = [sum(mass[: n + 1]) for n in range(length)]
            for layer in range(cfg.model.n_layers):
                for eps in cfg.eval.mixing_eps:
                    window = next(n + 1 for n, c in enumerate(cumulative) if c >= 1 - eps)
                    assert results["mixing_window"][key][str(eps)][layer][h] == window
                assert results["entropy"][key][layer][h] == pytest.approx(entropy, rel=1e-5)
                binned = results["mass_by_distance"][key]
                edges = binned["bin_edges"]
                expected = [sum(mass[a:b]) for a, b in itertools.pairwise(edges)]
                assert binned["mass"][layer][h] == pytest.approx(expected, rel=1e-4, abs=1e-9)
                if length > 32:  # mass beyond distance 32, per query that has such keys
                    far = sum(mass[32:]) * length / (length - 32)
                    assert results["far_mass"][key][layer][h] == pytest.approx(far, rel=1e-4)
    field = results["receptive_field"]
    assert field["series"] == [["converges"] * 4] * 2
    for h, m in enumerate(alibi_slopes(cfg.model.n_heads).tolist()):
        assert field["limit"]["0.01"][0][h] == math.ceil(math.log(100) / m)


def _needed_tiles(slopes: list[float], length: int, block: int, eps: float) -> float:
    """With zero queries and keys, the fraction of the causal (query tile, key tile) pairs that
    hold a key of attention weight above eps (the truncated geometric series): the least that
    skipping with skip_eps = eps can visit."""
    needed = causal = 0
    for m in slopes:
        r = math.exp(-m)
        for a in range(length // block):
            for b in range(a + 1):
                causal += 1
                needed += any(
                    r ** (i - j) * (1 - r) / (1 - r ** (i + 1)) > eps
                    for i in range(a * block, (a + 1) * block)
                    for j in range(b * block, min(i + 1, (b + 1) * block))
                )
    return needed / causal


def test_evaluation_reports_the_key_blocks_skipping_visits(stdlib_dataset):
    """Per diagnostic length and layer, the fraction of key tiles ALiBi's skipping visits: at
    least the tiles holding a key of weight above eps (zero queries and keys: the closed form),
    fewer with a larger eps; none for a scheme that skips nothing."""
    found = {}
    for eps in (1e-9, 0.05):
        cfg = _config(
            stdlib_dataset, *SHORT, "model.scheme=alibi", "model.attn_block=8",
            f"model.alibi_skip_eps={eps}",
        )  # fmt: skip
        model = _model(cfg, perturb=0.05)
        with torch.no_grad():
            for block in model.blocks:
                block.attn.wq.weight.zero_()
                block.attn.wk.weight.zero_()
        found[eps] = _evaluate(model, cfg)["visited_fraction"]["64"]
        least = _needed_tiles(alibi_slopes(cfg.model.n_heads).tolist(), 64, 8, eps)
        assert len(found[eps]) == cfg.model.n_layers
        assert all(least <= f <= 1 for f in found[eps]), (found[eps], least)
    assert all(a > b for a, b in zip(found[1e-9], found[0.05], strict=True)), found
    rope = _config(stdlib_dataset, *SHORT, "model.scheme=rope")
    assert _evaluate(_model(rope), rope)["visited_fraction"] == {}


def test_lengths_that_do_not_fit_or_run_out_of_memory_are_skipped(stdlib_dataset, monkeypatch):
    cfg = _config(stdlib_dataset, "data.seq_len=32", "eval.lengths=[32,64,128]")
    model = _model(cfg)
    fits_96 = forward_bytes(cfg.model, 1, 96, True) / cfg.eval.memory_fraction
    monkeypatch.setattr("evaluation.extrapolation.free_bytes", lambda device: fits_96)
    forward = model.forward

    def fails_at_64(tokens, *args, **kwargs):
        if tokens.shape[1] == 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "forward", fails_at_64)
    results = _evaluate(model, cfg)
    assert set(results["ppl"]) == {"32"}
    assert results["skipped"]["64"].startswith("out of memory: CUDA out of memory")
    assert "needs about" in results["skipped"]["128"] and "available" in results["skipped"]["128"]


def test_passkey_prompts(stdlib_dataset):
    tokenizer = load_tokenizer(stdlib_dataset)
    key = passkey_key(0, 300, 0.5, 1)
    assert key == passkey_key(0, 300, 0.5, 1) != passkey_key(0, 300, 0.5, 0)
    assert 10_000 <= key < 100_000
    needle = f"The pass key is {key}."
    positions = []
    for depth in (0.0, 0.5, 1.0):
        case = passkey_prompt(tokenizer, 300, depth, key)
        assert len(case.tokens) == 301
        text = tokenizer.decode(case.tokens)
        assert text.endswith(f"What is the pass key? The pass key is {key}")
        assert tokenizer.decode(case.tokens[-case.answer :]) == f" {key}"
        positions.append(text.index(needle) / len(text))
    assert positions[0] < 0.35 < positions[1] < 0.65 < positions[2]
    assert passkey_prompt(tokenizer, 40, 0.5, key) is None


def test_training_evaluates_every_checkpoint_as_the_standalone_cli_does(trained_run, tmp_path):
    eval_dir = trained_run / "eval"
    assert sorted(p.name for p in eval_dir.iterdir()) == [
        "ppl_vs_length.png",
        "step_2.json",
        "step_4.json",
    ]
    inside = json.loads((eval_dir / "step_4.json").read_text())
    assert inside["step"] == 4 and inside["train_length"] == 64 and inside["scheme"] == "hybrid"
    assert inside["lengths"] == [64, 128, 256] and inside["windows"] == {
        "64": 12,
        "128": 6,
        "256": 3,
    }
    assert set(inside["mixing_window"]) == {"64", "128", "256"} and inside["skipped"] == {}
    assert set(inside["passkey"]) == {"256"} and set(inside["passkey"]["256"]) == {"0.0", "1.0"}

    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").open()]
    logged = {r["step"]: r for r in records if "extrap/ppl@64" in r}
    assert set(logged) == {2, 4}
    assert logged[4]["extrap/ppl@256"] == inside["ppl"]["256"]
    assert logged[4]["extrap/ppl_beyond@128"] == inside["ppl_beyond"]["128"]
    events = EventAccumulator(str(trained_run / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "extrap/ppl_vs_length" in events.Tags()["images"]
    assert [e.step for e in events.Scalars("extrap/ppl@64")] == [2, 4]

    # One process, no engine, from the consolidated ZeRO-3 checkpoint: the same numbers.
    out = tmp_path / "standalone"
    code = evaluate.main([str(trained_run), "--step", "4", "--out", str(out), *EVAL_ARGS])
    assert code == 0
    alone = json.loads((out / "eval" / "step_4.json").read_text())
    for key in ("ppl", "ppl_beyond"):
        assert alone[key] == pytest.approx(inside[key], rel=1e-6), key
    assert alone["passkey_nll"]["256"] == pytest.approx(inside["passkey_nll"]["256"], rel=1e-5)
    for key in ("windows", "mixing_window", "passkey", "receptive_field"):
        assert alone[key] == inside[key], key
    assert (out / "eval" / "ppl_vs_length.png").stat().st_size > 10_000


def test_exported_weights_reproduce_the_validation_loss(trained_run, tmp_path):
    """launch.export's safetensors, loaded into a fresh model, give the perplexity the ZeRO-3
    engine measured on the same held-out text at that checkpoint."""
    export_dir = tmp_path / "export" / "step_4"
    assert export.main([str(trained_run), "--step", "4", "--out", str(export_dir)]) == 0
    assert evaluate.main([str(export_dir), "--out", str(tmp_path / "out"), *EVAL_ARGS]) == 0
    from_export = json.loads((tmp_path / "out" / "eval" / "step_4.json").read_text())
    inside = json.loads((trained_run / "eval" / "step_4.json").read_text())
    assert from_export["held_out"] == inside["held_out"]
    assert from_export["ppl"] == pytest.approx(inside["ppl"], rel=1e-6)


def test_a_later_evaluation_on_the_same_text_joins_the_earlier_one(trained_run, tmp_path):
    """As when training skipped the longest length for memory and a bigger machine does it."""
    (tmp_path / "eval").mkdir()
    full = json.loads((trained_run / "eval" / "step_4.json").read_text())
    partial = json.loads(json.dumps(full))
    for key in ("windows", "ppl", "ppl_beyond", "mixing_window", "far_mass", "entropy"):
        del partial[key]["256"]
    partial["skipped"] = {"256": "needs about 9 GiB for one sequence, 1 GiB available"}
    (tmp_path / "eval" / "step_4.json").write_text(json.dumps(partial))
    later = ["eval.lengths=[256]", "eval.windows=3", "eval.passkey_lengths=[]"]
    assert evaluate.main([str(trained_run), "--step", "4", "--out", str(tmp_path), *later]) == 0
    joined = json.loads((tmp_path / "eval" / "step_4.json").read_text())
    assert joined["lengths"] == [64, 128, 256] and joined["skipped"] == {}
    for key in ("ppl", "ppl_beyond"):
        assert joined[key] == pytest.approx(full[key], rel=1e-6), key
    for key in ("windows", "mixing_window", "far_mass", "passkey"):
        assert joined[key] == full[key], key

    # On other text (here, other windows) a new evaluation replaces the old one.
    other = ["eval.lengths=[128]", "eval.windows=1", "eval.passkey_lengths=[]"]
    assert evaluate.main([str(trained_run), "--step", "4", "--out", str(tmp_path), *other]) == 0
    replaced = json.loads((tmp_path / "eval" / "step_4.json").read_text())
    assert replaced["lengths"] == [128] and set(replaced["ppl"]) == {"128"}
    assert replaced["held_out"] == {**full["held_out"], "length": 128, "windows": 1}


def test_bad_targets_and_overrides_stop_with_the_fix(trained_run, tmp_path, capsys):
    def fails(*argv: str) -> str:
        assert evaluate.main([*argv, "--out", str(tmp_path)]) == 2
        return capsys.readouterr().err

    assert "does not exist" in fails(str(tmp_path / "missing"))
    assert "not a run directory" in fails(str(tmp_path))
    assert "has 2, 4" in fails(str(trained_run), "--step", "3")
    assert "cannot override model.n_layers=3" in fails(str(trained_run), "model.n_layers=3")
    assert "unknown config key 'eval.lenghts'" in fails(str(trained_run), "eval.lenghts=[64]")
    stray = fails(str(trained_run), "eval.diagnostic_lengths=[100]")
    assert "'eval.diagnostic_lengths' has [100]" in stray


def test_an_evaluation_never_destroys_recorded_results(
    trained_run, stdlib_dataset, tmp_path, capsys
):
    """Empty lengths, a corrupted checkpoint, a model gone non-finite and a dataset of another
    tokenizer (of the same size) all stop before step_4.json changes."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    recorded = (run / "eval" / "step_4.json").read_bytes()

    def fails(*argv: str) -> str:
        assert evaluate.main(list(argv)) == 2
        assert (run / "eval" / "step_4.json").read_bytes() == recorded
        return capsys.readouterr().err

    assert "'eval.lengths' is []" in fails(str(run), "eval.lengths=[]")

    # A file overwritten with as many other bytes: its size matches, its sha256 does not.
    biggest = max((run / "checkpoints" / "step_4").rglob("*.pt"), key=lambda p: p.stat().st_size)
    original = biggest.read_bytes()
    biggest.write_bytes(bytes(len(original)))
    err = fails(str(run), "--step", "4", *EVAL_ARGS)
    assert "step_4 is corrupted" in err and "its sha256 differs" in err
    biggest.write_bytes(original)

    # An export whose weights went NaN: its evaluation would replace finite perplexities.
    export_dir = run / "export" / "step_4"
    assert export.main([str(run), "--step", "4"]) == 0
    model, _ = exports.load_exported(export_dir)
    with torch.no_grad():
        model.blocks[0].attn.wq.weight.fill_(float("nan"))
    save_model(model, str(export_dir / "model.safetensors"))
    assert "--force" in fails(str(export_dir), *EVAL_ARGS)
    assert evaluate.main([str(export_dir), *EVAL_ARGS, "--force"]) == 0
    forced = json.loads((run / "eval" / "step_4.json").read_text())
    assert all(math.isnan(ppl) for ppl in forced["ppl"].values())
    (run / "eval" / "step_4.json").write_bytes(recorded)

    # Another tokenizer with the same vocabulary size: refused by content, not by size.
    other = tmp_path / "other"
    stdlib = Path(json.__file__).parents[1]
    prepare(
        [str(stdlib / "asyncio" / "*.py")], other, vocab_size=512, val_fraction=0.2, progress=False
    )
    assert load_tokenizer(other).get_vocab_size() == load_tokenizer(stdlib_dataset).get_vocab_size()
    err = fails(str(run), f"data.path={other}", *EVAL_ARGS)
    assert "was trained with tokenizer sha256" in err and f"data.path={other}" in err


def test_compare_writes_one_plot_and_one_table_labelled_by_scheme(trained_run, tmp_path, capsys):
    other = tmp_path / "alibi_run"
    shutil.copytree(trained_run / "eval", other / "eval")
    results = json.loads((other / "eval" / "step_4.json").read_text())
    results["scheme"], results["ppl"]["256"] = "alibi", 123.456
    (other / "eval" / "step_4.json").write_text(json.dumps(results))
    assert compare.main([str(trained_run), str(other), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert table[0].startswith("| run | scheme | step | L_train | ppl@64 | ppl@128 | ppl@256 |")
    assert table[2].startswith("| tiny | hybrid | 4 | 64 |")
    assert table[3].startswith("| alibi_run | alibi | 4 | 64 |") and "| 123.5 |" in table[3]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    assert "| alibi_run | alibi |" in capsys.readouterr().out
    assert compare.main([str(tmp_path / "nothing")]) == 2


def test_the_tiny_models_evaluation_at_64_times_128_tokens_fits_in_4_gb(stdlib_dataset, tmp_path):
    """Perplexity and diagnostics at 8192 tokens, in a fresh process on the CPU (a passkey
    case is one more forward pass of the same shape as a perplexity window)."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    export = tmp_path / "export"
    export.mkdir()
    save_model(Transformer(cfg.model, train_length=128), str(export / "model.safetensors"))
    meta = {
        "model": asdict(cfg.model),
        "train_length": 128,
        "data_path": str(stdlib_dataset),
        "step": 0,
        "tokens": 0,
        "tokenizer_sha256": read_manifest(stdlib_dataset)["tokenizer_sha256"],
        "source": "init",
    }
    (export / "config.json").write_text(json.dumps(meta))
    measure = (
        "import resource, sys\n"
        "from launch.evaluate import main\n"
        "code = main(sys.argv[1:])\n"
        "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    args = [
        str(export),
        "eval.lengths=[8192]",
        "eval.windows=1",
        "eval.diagnostic_lengths=[8192]",
        "eval.passkey_lengths=[]",
        "--device",
        "cpu",
    ]
    done = subprocess.run(
        [sys.executable, "-c", measure, *args], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peak_gib = int(done.stdout.split("peak_rss_kib")[-1]) / 2**20
    assert peak_gib < 4.0
    results = json.loads((export / "eval" / "step_0.json").read_text())
    assert results["skipped"] == {} and set(results["ppl"]) == {"8192"}
    assert set(results["mixing_window"]) == set(results["far_mass"]) == {"8192"}
