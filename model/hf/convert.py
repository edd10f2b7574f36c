"""Hugging Face exports of rotalibi models (`python -m launch.export RUN --hf | --llama`).

`write_hf` writes a directory that `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` and `AutoTokenizer.from_pretrained(DIR)` load: config.json (a
`RotalibiConfig` with `auto_map`), model.safetensors, modeling_rotalibi.py
(model/hf/modeling_rotalibi.py with its torch-only imports inlined by model/hf/source.py: it
imports nothing from rotalibi), tokenizer.json,
tokenizer_config.json and generation_config.json. `write_llama` writes a rope or nope model as
transformers' own `LlamaForCausalLM` (no remote code): the architectures match name for name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from data.tokenizer import EOS_TOKEN, TOKENIZER_FILE, eos_id, read_tokenizer_file
from model.config import SCHEMES, ModelConfig
from model.hf.source import write_modeling_file
from model.transformer import Transformer

LLAMA_SCHEMES = ("rope", "nope")
# nope as Llama: linear RoPE scaling by 1e30 turns every rotary angle below 1e-24 rad, so q and
# k stay unrotated to float32 precision (Llama has no switch to leave RoPE out).
NOPE_ROPE_SCALING = {"rope_type": "linear", "factor": 1e30}
# rotalibi's parameter names -> LlamaForCausalLM's (after blocks. -> model.layers.).
LLAMA_NAMES = (
    ("attn_norm.", "input_layernorm."),
    ("mlp_norm.", "post_attention_layernorm."),
    ("attn.wq.", "self_attn.q_proj."),
    ("attn.wk.", "self_attn.k_proj."),
    ("attn.wv.", "self_attn.v_proj."),
    ("attn.wo.", "self_attn.o_proj."),
    ("mlp.gate.", "mlp.gate_proj."),
    ("mlp.up.", "mlp.up_proj."),
    ("mlp.down.", "mlp.down_proj."),
)


class HFExportError(ValueError):
    """A model or tokenizer that cannot be exported as asked."""


def tokenizer_file(data_path: str | Path, sha256: str) -> Path:
    """The run's tokenizer.json (in its dataset), which must be the one it was trained with."""
    file = Path(data_path) / TOKENIZER_FILE
    if not file.is_file():
        raise HFExportError(f"{file} does not exist: the run's dataset (data.path) has moved")
    found = hashlib.sha256(file.read_bytes()).hexdigest()
    if found != sha256:
        raise HFExportError(
            f"{file} has sha256 {found[:12]}…, but the model was trained with tokenizer "
            f"{sha256[:12]}…: the dataset at data.path was rebuilt since"
        )
    return file


def rotalibi_config(cfg: ModelConfig, train_length: int, eos: int):
    """The `RotalibiConfig` of a model: its scheme as the mechanisms it combines."""
    from model.hf.modeling_rotalibi import RotalibiConfig

    spec = SCHEMES[cfg.scheme]
    return RotalibiConfig(
        scheme=cfg.scheme,
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.kv_heads,
        mlp_hidden=cfg.hidden_dim,
        norm_eps=cfg.norm_eps,
        init_std=cfg.init_std,
        train_length=train_length,
        rotation=spec.rotation,
        rotate_values=spec.rotate_values,
        bias=spec.bias,
        forget=spec.forget,
        window=(cfg.window or train_length) if spec.window else None,
        decay=spec.decay,
        transport=spec.transport,
        absolute=spec.absolute,
        rope_base=cfg.rope_base,
        xpos_scale_base=cfg.xpos_scale_base,
        xpos_gamma=cfg.xpos_gamma,
        sandwich_dim=cfg.sandwich_dim,
        path_rank=cfg.path_rank,
        path_conv=cfg.path_conv,
        tie_word_embeddings=cfg.tie_embeddings,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def check_llama(scheme: str) -> None:
    """Only rope and nope models are Llama models."""
    if scheme not in LLAMA_SCHEMES:
        raise HFExportError(
            f"a {scheme} model has no LlamaForCausalLM equivalent (only "
            f"{' and '.join(LLAMA_SCHEMES)} have): export it with --hf instead"
        )


def llama_config(cfg: ModelConfig, train_length: int, eos: int):
    """The `LlamaConfig` of a rope or nope model."""
    from transformers import LlamaConfig

    check_llama(cfg.scheme)
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=train_length,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_base,
        rope_scaling=NOPE_ROPE_SCALING if cfg.scheme == "nope" else None,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=cfg.tie_embeddings,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def _llama_name(name: str) -> str:
    if name.startswith("blocks."):
        name = "model.layers." + name.removeprefix("blocks.")
        for ours, theirs in LLAMA_NAMES:
            name = name.replace(f".{ours}", f".{theirs}")
        return name
    return {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}.get(
        name, name
    )


def _loaded(hf_model, state: dict[str, Tensor]):
    """The (meta-device) transformers model holding `state`'s tensors, tied weights tied."""
    hf_model.load_state_dict(state, strict=True, assign=True)
    hf_model.tie_weights()
    return hf_model


def to_hf(model: Transformer, train_length: int, eos: int):
    """`model` as a `RotalibiForCausalLM` sharing its weights."""
    from model.hf.modeling_rotalibi import RotalibiForCausalLM

    with torch.device("meta"):
        hf_model = RotalibiForCausalLM(rotalibi_config(model.cfg, train_length, eos))
    state = {
        name if name.startswith("lm_head.") else f"model.{name}": value
        for name, value in model.state_dict().items()
    }
    return _loaded(hf_model, state)


def to_llama(model: Transformer, train_length: int, eos: int):
    """A rope or nope `model` as transformers' `LlamaForCausalLM` sharing its weights."""
    from transformers import LlamaForCausalLM

    config = llama_config(model.cfg, train_length, eos)
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(config)
    return _loaded(
        hf_model, {_llama_name(name): value for name, value in model.state_dict().items()}
    )


def _save(hf_model, tokenizer: Path, eos: int, out: Path) -> Path:
    """Save a transformers model, its generation defaults and the tokenizer into `out`."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    hf_model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out, safe_serialization=True)
    PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer),
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,  # decode(encode(text)) == text, byte for byte
    ).save_pretrained(out)
    return out


def write_hf(model: Transformer, train_length: int, tokenizer: Path, out: Path) -> Path:
    """Export `model` (any scheme) as a transformers remote-code model into `out`."""
    from model.hf.modeling_rotalibi import RotalibiConfig, RotalibiForCausalLM

    eos = eos_id(read_tokenizer_file(tokenizer))
    RotalibiConfig.register_for_auto_class()
    RotalibiForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    _save(to_hf(model, train_length, eos), tokenizer, eos, out)
    write_modeling_file(out)  # the file transformers copied, with its imports inlined
    return out


def write_llama(model: Transformer, train_length: int, tokenizer: Path, out: Path) -> Path:
    """Export a rope or nope `model` as transformers' LlamaForCausalLM into `out`."""
    eos = eos_id(read_tokenizer_file(tokenizer))
    return _save(to_llama(model, train_length, eos), tokenizer, eos, out)
