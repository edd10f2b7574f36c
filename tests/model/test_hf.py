"""Models outside rotalibi: cached decoding against the full forward, the Hugging Face export
of every scheme against rotalibi's own forward, rope/nope as LlamaForCausalLM, the tokenizer
round trip, generation with and without the cache, padding, the CLIs (export, generate,
lm-eval) and their errors."""

from __future__ import annotations

import ast
import copy
import json
import math
import shutil

import pytest
import torch
from conftest import small_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.tokenizer import decode_document, eos_id, load_tokenizer
from data.validation import validation_windows
from evaluation import harness
from launch import export, generate, lm_eval
from model import ModelConfig, Transformer
from model.config import SCHEMES
from model.decoding import DecodingCache
from model.hf.convert import write_hf, write_llama
from training import export as exports

SELF_CONTAINED = {"__future__", "collections", "dataclasses", "math", "torch", "transformers"}
GENERATION_SCHEMES = ["hybrid", "rope", "alibi", "local", "path", "xpos"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _imported_roots(file) -> set[str]:
    tree = ast.parse(file.read_text())
    names = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return {name.split(".")[0] for name in names}


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def held_out(stdlib_dataset) -> torch.Tensor:
    """Rows of real held-out text: 3 x 301 tokens."""
    return validation_windows(str(stdlib_dataset), 300, 3, seed=0)


def _trained(scheme: str, stdlib_dataset, steps: int = 15) -> Transformer:
    """A small float32 model of `scheme` trained a few AdamW steps on the dataset's text, so
    every learned part (angle projections, KERPLE, PaTH) is away from its initial value."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        scheme=scheme,
        vocab_size=load_tokenizer(stdlib_dataset).get_vocab_size(),
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        sandwich_dim=8,
        window=40,
    )
    model = Transformer(cfg, train_length=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = validation_windows(str(stdlib_dataset), 64, steps * 4, seed=1).view(steps, 4, 65)
    for batch in batches:
        optimizer.zero_grad()
        model.loss(batch[:, :-1], batch[:, 1:]).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def exported(stdlib_dataset, tmp_path_factory) -> dict:
    """Every scheme trained a few steps and exported with `write_hf`: (model, export dir)."""
    tokenizer = stdlib_dataset / "tokenizer.json"
    out = {}
    for scheme in SCHEMES:
        model = _trained(scheme, stdlib_dataset)
        out[scheme] = model, write_hf(model, 64, tokenizer, tmp_path_factory.mktemp(scheme))
    return out


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_cached_decoding_equals_the_full_forward(scheme):
    """float64: a prefill, single tokens and a chunk through the cache give the full forward's
    logits (windows trimmed, angles carried, PaTH's keys transported)."""
    model = small_model(scheme)  # window 11, attention block 8
    tokens = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
    cache = DecodingCache(model.cfg.n_layers)
    pieces = [model.decode(tokens[:, :23], cache)]
    pieces += [model.decode(tokens[:, t : t + 1], cache) for t in range(23, 33)]
    pieces.append(model.decode(tokens[:, 33:], cache))
    assert _relative_error(torch.cat(pieces, dim=1), full) < 1e-12


def test_every_scheme_exports_to_transformers_with_rotalibis_logits(exported, held_out):
    rows = held_out[:, :300]
    for scheme, (model, directory) in exported.items():
        assert _imported_roots(directory / "modeling_rotalibi.py") <= SELF_CONTAINED
        loaded = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
        with torch.no_grad():
            expected, got = model(rows), loaded(rows).logits
        assert _relative_error(got, expected) < 1e-5, scheme
        config = json.loads((directory / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rotalibi.RotalibiForCausalLM"


def test_rope_and_nope_export_as_native_llama(exported, held_out, stdlib_dataset, tmp_path):
    rows = held_out[:, :300]
    for scheme in ("rope", "nope"):
        model = exported[scheme][0]
        directory = write_llama(model, 64, stdlib_dataset / "tokenizer.json", tmp_path / scheme)
        assert not (directory / "modeling_rotalibi.py").exists()
        loaded = AutoModelForCausalLM.from_pretrained(directory)
        assert type(loaded).__name__ == "LlamaForCausalLM"
        with torch.no_grad():
            assert _relative_error(loaded(rows).logits, model(rows)) < 1e-5, scheme


def test_the_tokenizer_round_trips_text_byte_for_byte(exported, stdlib_dataset):
    tokenizer = AutoTokenizer.from_pretrained(exported["hybrid"][1])
    ours = load_tokenizer(stdlib_dataset)
    held_out = validation_windows(str(stdlib_dataset), 2000, 1, seed=2)[0].tolist()
    for text in (
        decode_document(ours, [*held_out, 0]),
        "def f(x):\n\treturn x  # ünïcode ✓ \r\n\n  trailing  ",
        " leading space, ,  double  spaces , and 'quotes' .",
    ):
        ids = tokenizer(text)["input_ids"]
        assert ids == ours.encode(text).ids
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == eos_id(ours)


def _greedy_by_full_forward(model: Transformer, prompt: list[int], new: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt) :]


def test_greedy_generation_with_the_cache_equals_recomputing_everything(
    exported, held_out, stdlib_dataset, tmp_path
):
    """With weights moved off the briefly trained ones (which repeat one token), 64 greedy
    tokens through the cache equal those of a full forward at every step."""
    prompt = held_out[0, :20].tolist()
    eos = eos_id(load_tokenizer(stdlib_dataset))
    torch.manual_seed(0)
    for scheme in GENERATION_SCHEMES:
        model = copy.deepcopy(exported[scheme][0])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        directory = write_hf(model, 64, stdlib_dataset / "tokenizer.json", tmp_path / scheme)
        cached = generate.sample(model, prompt, 64)
        assert cached == _greedy_by_full_forward(model, prompt, 64), scheme
        assert len(set(cached)) > 5, scheme  # not one token repeated

        loaded = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
        runs = {
            use_cache: loaded.generate(
                torch.tensor([prompt]),
                max_new_tokens=64,
                min_new_tokens=64,
                do_sample=False,
                use_cache=use_cache,
            )[0, 20:].tolist()
            for use_cache in (True, False)
        }
        # generate holds back the end-of-text token until min_new_tokens; `sample` does not.
        agreed = cached.index(eos) if eos in cached else len(cached)
        assert runs[True] == runs[False] and runs[True][:agreed] == cached[:agreed], scheme
        beams = [
            loaded.generate(torch.tensor([prompt]), max_new_tokens=8, num_beams=3, use_cache=c)
            for c in (True, False)
        ]
        assert beams[0].tolist() == beams[1].tolist(), scheme


def test_padding_is_invisible_in_the_forward_and_in_generation(exported, held_out):
    """A left-padded batch gives each row the logits and greedy continuation it has alone."""
    for scheme in ("hybrid", "path", "sinusoidal", "local"):
        loaded = AutoModelForCausalLM.from_pretrained(exported[scheme][1], trust_remote_code=True)
        short, long = held_out[1, :30], held_out[2, :45]
        batch = torch.stack((torch.cat((torch.zeros(15, dtype=torch.long), short)), long))
        mask = torch.ones_like(batch)
        mask[0, :15] = 0
        with torch.no_grad():
            padded = loaded(batch, attention_mask=mask).logits
            alone = loaded(short[None]).logits
        assert _relative_error(padded[0, 15:], alone[0]) < 1e-5, scheme
        together = loaded.generate(batch, attention_mask=mask, max_new_tokens=16, do_sample=False)
        by_itself = loaded.generate(short[None], max_new_tokens=16, do_sample=False)
        assert together[0, 45:].tolist() == by_itself[0, 30:].tolist(), scheme


def test_export_and_generate_from_a_zero3_run(trained_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export.main([str(trained_run), "--step", "4", "--hf", "--out", str(out)]) == 0
    model, _ = exports.model_from_checkpoint(exports.pick_checkpoint(trained_run, 4))
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    rows = torch.randint(0, 512, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _relative_error(loaded(rows).logits, model(rows)) < 1e-5

    capsys.readouterr()
    assert export.main([str(trained_run), "--llama", "--out", str(tmp_path / "llama")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "a hybrid model has no LlamaForCausalLM" in error
    assert not (tmp_path / "llama").exists()

    args = [str(trained_run), "--prompt", "import os\n", "--max-new-tokens", "12"]
    texts = []
    for _ in range(2):
        assert generate.main([*args, "--temperature", "1.0", "--seed", "3"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("import os\n") and len(texts[0]) > 12
    with pytest.raises(SystemExit):
        generate.main([*args, "--top-p", "0"])
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err
    assert generate.main([str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def _rolling_bits_per_byte(model: Transformer, tokenizer, texts: list[str], length: int) -> float:
    """Perplexity of whole documents in windows: each window predicts up to `length` new tokens
    from a context of at most `length` tokens ending just before its last target; the first
    token is predicted from the end-of-text token."""
    eos, nll, size = eos_id(tokenizer), 0.0, 0
    for text in texts:
        ids = tokenizer.encode(text).ids
        seq = torch.tensor([eos, *ids])
        start, end = 0, min(length, len(ids))
        while start < len(ids):
            window = seq[max(0, end - length) : end + 1]
            with torch.no_grad():
                logits = model(window[None, :-1])[0, -(end - start) :]
            nll += torch.nn.functional.cross_entropy(
                logits, window[-(end - start) :], reduction="sum"
            ).item()
            start, end = end, min(end + length, len(ids))
        size += len(text.encode())
    return nll / size / math.log(2)


def test_lm_eval_on_the_local_task(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert lm_eval.main([str(run), "--tasks", "rotalibi_heldout", "--limit", "8"]) == 0
    results = json.loads((run / "eval" / "lm_eval" / "step_4.json").read_text())
    assert results["n-samples"]["rotalibi_heldout"] == {"original": 24, "effective": 8}
    measured = results["results"]["rotalibi_heldout"]["bits_per_byte,none"]

    model, config = exports.model_from_checkpoint(exports.pick_checkpoint(run, 4))
    lines = (harness.TASKS_DIR / "rotalibi_heldout" / "heldout.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines[:8]]
    tokenizer = load_tokenizer(config["data"]["path"])
    assert measured == pytest.approx(_rolling_bits_per_byte(model, tokenizer, texts, 64), rel=1e-4)

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    [scalar] = events.Scalars("lm_eval/rotalibi_heldout/bits_per_byte")
    assert scalar.step == 4 and scalar.value == pytest.approx(measured, rel=1e-6)

    capsys.readouterr()

    def fails(*argv: str) -> str:
        assert lm_eval.main(list(argv)) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0
        return error

    assert "did you mean rotalibi_heldout" in fails(str(run), "--tasks", "rotalibi_heldot")
    assert "missing does not exist" in fails(str(tmp_path / "missing"))
    assert "holds no complete checkpoint" in fails(str(tmp_path))
    config_file = run / "export" / "hf_step_4" / "config.json"
    broken = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**broken, "bias": "fire"}))
    assert "bias='fire' is not one of" in fails(str(run), "--limit", "1")
