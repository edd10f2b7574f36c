"""launch.plan: parameter counts against the models, saved activations against autograd, and
the tiny config's memory estimate against the peak of a real CPU training step."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from data.loader import build_train_loader
from launch import plan as planner
from model import SCHEMES, ModelConfig, Transformer
from training.config import load_config
from training.engine import build_model, parameter_groups
from training.metrics import training_flops_per_token

SHAPES = dict(vocab_size=61, d_model=64, n_layers=2, n_heads=4, sandwich_dim=16, attn_block=64)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_parameter_count_and_flops_equal_the_models(scheme):
    for extra in ({}, {"n_kv_heads": 2, "tie_embeddings": False, "mlp_hidden": 96}):
        cfg = ModelConfig(scheme=scheme, **SHAPES, **extra)
        model = Transformer(cfg, train_length=100)
        assert planner.parameter_count(cfg) == sum(p.numel() for p in model.parameters())
        window = model.blocks[0].attn.position.window
        assert planner.flops_per_token(cfg, 100) == pytest.approx(
            training_flops_per_token(model, 100, window)
        )


def test_tiny_parameter_count_equals_its_model():
    cfg = load_config("configs/tiny.yaml")
    model = build_model(cfg, 1, torch.device("cpu"))
    assert planner.parameter_count(cfg.model) == sum(p.numel() for p in model.parameters())


def test_7b_parameter_count_is_the_closed_form_and_main_prints_the_table(capsys):
    m = load_config("configs/7b.yaml").model
    assert (m.scheme, m.tie_embeddings) == ("hybrid", False)
    d, V, L, F = m.d_model, m.vocab_size, m.n_layers, m.mlp_hidden
    q_heads, kv_heads, head_dim = m.n_heads, m.n_kv_heads, m.d_model // m.n_heads
    attention = d * q_heads * head_dim + 2 * d * kv_heads * head_dim + q_heads * head_dim * d
    mlp = 3 * d * F  # SwiGLU: gate, up, down
    norms = 2 * d  # before attention and before the MLP
    angles = (d + 1) * kv_heads * head_dim // 2  # hybrid's delta = b + W x per key/value head
    embedding = head = V * d  # untied
    expected = embedding + L * (attention + mlp + norms + angles) + d + head  # + final norm
    assert expected == 6_006_525_952
    assert planner.parameter_count(m) == expected
    with torch.device("meta"):
        assert sum(p.numel() for p in Transformer(m, train_length=4096).parameters()) == expected
    assert planner.main(["configs/7b.yaml"]) == 0
    out = capsys.readouterr().out
    for needed in (f"{expected:,}", "ZeRO-3", "bf16", "128 cuda ranks", "FLOPs per token"):
        assert needed in out
    assert "262,144" in out  # the evaluation table reaches 64 x the trained length


def test_bad_inputs_stop_in_one_line(capsys):
    assert planner.main(["configs/7b_128k.yaml", "--gpus", "12"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.sequence_parallel=8 does not divide") and "\n" not in err
    assert planner.main(["configs/7b.yaml", "--device", "cpu"]) == 2
    assert "deepspeed.precision=bf16 needs a GPU" in capsys.readouterr().err
    assert planner.main(["configs/tiny.yaml", "model.n_heads=5"]) == 2


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--peak-tflops", "inf"),
        ("--peak-tflops", "-inf"),
        ("--peak-tflops", "nan"),
        ("--peak-tflops", "1e400"),
        ("--peak-tflops", "0"),
        ("--peak-tflops", "-5"),
        ("--peak-tflops", "1e7"),
        ("--peak-tflops", "1e-300"),
        ("--peak-tflops", "fast"),
        ("--mfu", "nan"),
        ("--mfu", "inf"),
        ("--mfu", "0"),
        ("--mfu", "1.5"),
        ("--mfu", "1e-300"),
        ("--gpus", "0"),
        ("--gpus", "-8"),
        ("--gpus", "1.5"),
        ("--gpus", "99999999999999999999999"),
    ],
)
def test_numeric_options_out_of_range_are_one_line_errors(capsys, option, value):
    """Each numeric option is a finite number in its range, refused in one line (exit 2), never
    a ZeroDivisionError or a plan of infinite or zero time."""
    assert planner.main(["configs/tiny.yaml", f"{option}={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: argument {option}: ") and err.count("\n") == 1, err
    assert repr(value) in err


def test_numeric_options_at_their_limits_plan(capsys):
    for args in (["--peak-tflops=1e6", "--mfu=1"], ["--peak-tflops=1e-6", "--mfu=1e-6"]):
        assert planner.main(["configs/tiny.yaml", "--gpus=1048576", *args]) == 0
        out = capsys.readouterr().out
        assert "time per step" in out and "inf" not in out and "nan" not in out


def test_argument_errors_are_one_line(capsys):
    assert planner.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the following arguments are required: config") and (
        err.count("\n") == 1
    )


def test_fused_head_dims_are_the_kernels():
    from kernels.hybrid.attention import HEAD_DIMS

    assert planner.FUSED_HEAD_DIMS == HEAD_DIMS


def _saved_storages(run) -> int:
    """Bytes of the distinct storages autograd saves while `run()` builds its graph, weights
    and buffers left out. (bench.sequence_parallel.saved_for_backward counts every save, so a
    tensor saved by three ops, and the weights, count again: not the memory held.)"""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model = run()
    for t in (*model.parameters(), *model.buffers()):
        seen.pop(t.untyped_storage().data_ptr(), None)
    return sum(seen.values())


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_saved_activations_are_what_autograd_saves(scheme):
    """The whole model's forward with the loss, fp32 and bf16, with and without packed
    documents and grouped-query heads: within 0.5% of the distinct saved storages."""
    B, T = 2, 100
    for dtype, kv, packed in ((torch.float32, 4, True), (torch.bfloat16, 2, False)):
        cfg = ModelConfig(scheme=scheme, **{**SHAPES, "n_kv_heads": kv})
        model = Transformer(cfg, train_length=T).to(dtype)
        tokens = torch.randint(0, cfg.vocab_size, (B, T + 1))
        doc_ids = (torch.arange(T) * 3 // T).expand(B, T).contiguous() if packed else None

        def run(model=model, tokens=tokens, doc_ids=doc_ids):
            model(tokens[:, :-1], doc_ids, targets=tokens[:, 1:])
            return model

        rt = planner.Runtime(dtype.itemsize, cuda=False, fused=False, packed=packed)
        estimate = cfg.n_layers * planner.layer_saved_bytes(cfg, rt, B, T)
        estimate += planner.model_saved_bytes(cfg, rt, B * T)
        assert estimate == pytest.approx(_saved_storages(run), rel=0.005), (dtype, kv, packed)


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensor storages alive, and their peak: each storage an op returns is
    counted from then until it is freed (a weakref finalizer)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiny_estimate_is_within_25_percent_of_a_training_steps_peak(stdlib_dataset, checkpointing):
    """One real batch of the tiny config (packed documents), in float32, through a plain
    PyTorch step with DeepSpeed's CPU layout for fp32 ZeRO (torch AdamW: 2 fp32 moments, the
    weights updated in place, fp32 gradients): every storage alive counted from the model's
    construction on; the peak of the second step (the optimizer's states exist) against the
    plan's weights + gradients + optimizer states + activations (saved and transient). ZeRO's
    own buffers are not in a plain step, nor in the sum."""
    cfg = load_config(
        "configs/tiny.yaml",
        [f"data.path={stdlib_dataset}", f"train.activation_checkpointing={checkpointing}"],
    )
    loader = build_train_loader(
        cfg.data, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, seed=0
    )
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    assert batch["doc_ids"] is not None
    tracker = LiveBytes()
    with tracker:
        model = build_model(cfg, 1, torch.device("cpu"))
        model.activation_checkpointing = checkpointing
        groups = parameter_groups(model, cfg.train.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas))
        for _ in range(2):
            tracker.peak = before = tracker.now
            total, count = model(batch["tokens"], batch["doc_ids"], targets=batch["targets"])
            kept = tracker.now - before
            (total / count).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    plan = planner.plan(cfg, gpus=1, device="cpu")
    saved = plan.saved_checkpointed if checkpointing else plan.saved
    assert saved == pytest.approx(kept, rel=0.05)  # what the forward left alive
    estimate = plan.weights + plan.gradients + plan.optimizer + plan.activations
    ratio = estimate / tracker.peak
    assert 0.75 <= ratio <= 1.25, f"estimate {estimate:,} B, measured peak {tracker.peak:,} B"


def test_sequence_parallelism_divides_activations_and_offload_moves_states():
    cfg = load_config("configs/7b_128k.yaml")
    split = planner.plan(cfg)
    whole = planner.plan(load_config("configs/7b_128k.yaml", ["train.sequence_parallel=1"]))
    assert split.tokens * 8 == whole.tokens
    assert split.saved == pytest.approx(whole.saved / 8, rel=0.01)
    offloaded = planner.plan(load_config("configs/7b.yaml", ["deepspeed.offload_optimizer=true"]))
    base = planner.plan(load_config("configs/7b.yaml"))
    assert offloaded.optimizer == 0 and offloaded.host == base.optimizer + base.gradients


def test_7b_128k_evaluates_up_to_1m_tokens_on_80_gb(capsys):
    """Every evaluation length, 1x to 8x the trained 131,072, fits an 80 GB GPU with the
    resident training state; the per-token figure is the hand count for the 7b hybrid in bf16."""
    cfg = load_config("configs/7b_128k.yaml")
    p = planner.plan(cfg)
    residual = 2 * 4096  # d_model 4096 in bf16
    keys_values = 2 * 2 * 8 * 128  # 8 key/value heads of 128, bf16
    # The hybrid's angles over 8 heads x 64 pairs while the scan makes them: float32 increments,
    # their padded copy and chunk sums, two float64 offset tensors, the float32 angles.
    angles = (4 + 4 + 4 + 8 + 8 + 4) * 8 * 64
    per_token = residual + keys_values + angles
    assert per_token == 28_672
    assert [e.length for e in p.evaluation] == [131_072, 262_144, 524_288, 1_048_576]
    resident = p.weights + p.gradients + p.optimizer + p.buffers
    for e in p.evaluation:
        assert e.token_bytes == per_token
        assert resident + e.length * per_token <= e.memory <= 80 * 2**30
        assert e.forward <= cfg.eval.memory_fraction * (80 * 2**30 - resident)
        assert e.memory_split < e.memory or e.length in cfg.eval.diagnostic_lengths
    assert planner.main(["configs/7b_128k.yaml"]) == 0
    rows = capsys.readouterr().out.splitlines()
    for e in p.evaluation:
        row = next(line.split() for line in rows if line.strip().startswith(f"{e.length:,} x"))
        assert row[3] == f"{per_token:,}" and row[-1] == "yes", row
