"""Hugging Face Llama format: export an LLMModel, or import a Llama checkpoint to fine-tune.

An exported directory loads offline with `transformers.AutoModelForCausalLM.from_pretrained(DIR)`
as a `LlamaForCausalLM` (and with `AutoTokenizer.from_pretrained(DIR)` when a tokenizer.json was
given), so lm-eval, vLLM and llama.cpp's converters can use it:

    from raylm.export import export_hf, import_hf
    export_hf(model, "out/hf", tokenizer_dir="data/tokenizer", eos_token="<|endoftext|>")
    model = import_hf("out/hf")

raylm's attention and MLP use fused projections (qkv_proj = [q; k; v], gate_up_proj = [gate; up]
stacked along the output dim); they are split into / concatenated from HF's separate q/k/v and
gate/up matrices here. Both use the "rotate_half" rotary layout, so no permutation is needed.
Weights are read and written as safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from raylm.model import LLMModel, ModelConfig
from raylm.storage import plain_name

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"  # sharded checkpoints (large HF models)


def config_to_hf(
    config: ModelConfig,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """The config.json of a LlamaForCausalLM with `config`'s architecture."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # transformers >= 5 reads rope_parameters; older readers (transformers 4.x, converters) read rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": config.init_std,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        # transformers >= 4.56 reads dtype; older versions read torch_dtype.
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def config_from_hf(hf_config: Mapping) -> ModelConfig:
    """The ModelConfig of a Llama config.json (transformers 4.x or 5.x layout).

    Raises ValueError listing every feature raylm's model does not implement (rope scaling,
    biases, other activations, decoupled head_dim, other architectures) rather than importing a
    model that would silently compute something else. dropout is set to 0.
    """
    hf = dict(hf_config)
    problems = []
    if hf.get("model_type") != "llama":
        problems.append(f"model_type is {hf.get('model_type')!r}, only 'llama' is supported")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            problems.append(f"{key}=true is not supported (raylm's projections have no bias)")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope scaling (rope_type {rope_type!r}) is not supported, only plain rotary embeddings")
    partial_rotary = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial_rotary != 1.0:
        problems.append(f"partial_rotary_factor {partial_rotary} is not supported (only 1.0)")
    hidden_size, num_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden_size // num_heads
    if head_dim * num_heads != hidden_size:
        problems.append(f"head_dim {head_dim} * num_attention_heads {num_heads} != hidden_size {hidden_size}")
    if problems:
        raise ValueError("cannot import this Llama config: " + "; ".join(problems))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden_size,
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        dropout=0.0,
        init_std=hf.get("initializer_range", 0.02),
    )


def _check_keys(actual: set[str], required: set[str], optional: set[str], what: str) -> None:
    missing, unexpected = sorted(required - actual), sorted(actual - required - optional)
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model config: missing {missing[:6]}, unexpected {unexpected[:6]}"
            + (" (strip the 'module.' / '_orig_mod.' prefixes of DDP / torch.compile wrappers)"
               if any(k.startswith(("module.", "_orig_mod.")) for k in unexpected) else "")
        )


def state_dict_to_hf(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """raylm parameter names/layout -> LlamaForCausalLM's. Takes a state dict (not a model) so a
    checkpoint's weights can be converted without building a model. The results may be views of
    the inputs. With tied embeddings HF stores only model.embed_tokens.weight; a raylm state dict
    may hold the shared matrix under embed_tokens.weight, lm_head.weight or both."""
    layer_keys = {f"layers.{i}.{name}.weight" for i in range(config.num_layers)
                  for name in ("attn_norm", "attn.qkv_proj", "attn.o_proj", "mlp_norm", "mlp.gate_up_proj",
                               "mlp.down_proj")}
    vocab_keys = {"embed_tokens.weight", "lm_head.weight"}
    if config.tie_embeddings:
        _check_keys(set(state_dict), layer_keys | {"norm.weight"}, vocab_keys, "raylm state dict")
        embedding = state_dict.get("embed_tokens.weight", state_dict.get("lm_head.weight"))
        if embedding is None:
            raise ValueError("raylm state dict has neither embed_tokens.weight nor lm_head.weight")
        hf = {"model.embed_tokens.weight": embedding}
    else:
        _check_keys(set(state_dict), layer_keys | {"norm.weight"} | vocab_keys, set(), "raylm state dict")
        hf = {"model.embed_tokens.weight": state_dict["embed_tokens.weight"],
              "lm_head.weight": state_dict["lm_head.weight"]}
    hf["model.norm.weight"] = state_dict["norm.weight"]
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    for i in range(config.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state_dict[src + "attn.qkv_proj.weight"].split([q_size, kv_size, kv_size], dim=0)
        gate, up = state_dict[src + "mlp.gate_up_proj.weight"].chunk(2, dim=0)
        hf.update({
            dst + "input_layernorm.weight": state_dict[src + "attn_norm.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state_dict[src + "attn.o_proj.weight"],
            dst + "post_attention_layernorm.weight": state_dict[src + "mlp_norm.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state_dict[src + "mlp.down_proj.weight"],
        })
    return hf


def hf_to_state_dict(hf_state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM parameter names/layout -> raylm's (the inverse of state_dict_to_hf). With
    tied embeddings, lm_head.weight is the embedding tensor itself."""
    hf = {k: v for k, v in hf_state_dict.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints
    layer_keys = {f"model.layers.{i}.{name}.weight" for i in range(config.num_layers)
                  for name in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                               "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                               "mlp.down_proj")}
    required = layer_keys | {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_embeddings:
        required.add("lm_head.weight")
    _check_keys(set(hf), required, {"lm_head.weight"}, "Hugging Face state dict")
    embedding = hf["model.embed_tokens.weight"]
    state = {
        "embed_tokens.weight": embedding,
        "norm.weight": hf["model.norm.weight"],
        "lm_head.weight": embedding if config.tie_embeddings else hf["lm_head.weight"],
    }
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        state.update({
            dst + "attn_norm.weight": hf[src + "input_layernorm.weight"],
            dst + "attn.qkv_proj.weight": torch.cat(
                [hf[src + f"self_attn.{name}_proj.weight"] for name in ("q", "k", "v")], dim=0
            ),
            dst + "attn.o_proj.weight": hf[src + "self_attn.o_proj.weight"],
            dst + "mlp_norm.weight": hf[src + "post_attention_layernorm.weight"],
            dst + "mlp.gate_up_proj.weight": torch.cat(
                [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0
            ),
            dst + "mlp.down_proj.weight": hf[src + "mlp.down_proj.weight"],
        })
    return state


def _special_token(tokenizer: Tokenizer, name: str, token: str | None, token_id: int | None) -> tuple:
    """(token, id) of a special token given by either or both, checked against the vocabulary."""
    if token is not None:
        looked_up = tokenizer.token_to_id(token)
        if looked_up is None:
            raise ValueError(f"{name}_token {token!r} is not in the tokenizer's vocabulary")
        if token_id is not None and token_id != looked_up:
            raise ValueError(f"{name}_token {token!r} has id {looked_up}, but {name}_token_id is {token_id}")
        return token, looked_up
    if token_id is not None:
        token = tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"{name}_token_id {token_id} is not in the tokenizer's vocabulary")
    return token, token_id


def export_hf(
    model: LLMModel,
    output_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    bos_token: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a Hugging Face Llama directory: config.json, model.safetensors,
    generation_config.json and, when tokenizer_dir holds a tokenizer.json, tokenizer.json +
    tokenizer_config.json. Returns the directory.

    Special tokens may be given as strings (eos_token="</s>"), ids, or both; with a tokenizer each
    is completed from the other and checked. The directory is written under a temporary name next
    to output_dir and renamed into place, so a failed export leaves nothing behind; an existing
    output_dir is replaced only with overwrite=True.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    config = model.config
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists: choose another output folder, or replace it with "
                              "--overwrite (overwrite=True from Python)")

    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir is not None else None
    tokenizer = None
    if tokenizer_file is not None and tokenizer_file.is_file():
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        if tokenizer.get_vocab_size(with_added_tokens=True) > config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens but the model "
                f"only {config.vocab_size} embeddings: export with the tokenizer the model was trained with"
            )
        eos_token, eos_token_id = _special_token(tokenizer, "eos", eos_token, eos_token_id)
        pad_token, pad_token_id = _special_token(tokenizer, "pad", pad_token, pad_token_id)
        bos_token, bos_token_id = _special_token(tokenizer, "bos", bos_token, bos_token_id)
    elif tokenizer_file is not None:
        warnings.warn(f"{tokenizer_file} not found: exporting the model without tokenizer files", stacklevel=2)
    if tokenizer is None and (eos_token, pad_token, bos_token) != (None, None, None):
        raise ValueError("special tokens given as strings need a tokenizer_dir holding a tokenizer.json")

    weights = {
        name: tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()  # own storage each
        for name, tensor in state_dict_to_hf(model.state_dict(), config).items()
    }
    token_ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = output_dir.with_name(f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp_dir.mkdir()
    try:
        hf_config = config_to_hf(config, **token_ids, dtype=dtype)
        (tmp_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        generation_config = {key: value for key, value in token_ids.items() if value is not None}
        (tmp_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        save_file(weights, tmp_dir / WEIGHTS_NAME, metadata={"format": "pt"})
        if tokenizer is not None:
            shutil.copyfile(tokenizer_file, tmp_dir / "tokenizer.json")
            special = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
            tokenizer_config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": config.max_seq_len,
                "clean_up_tokenization_spaces": False,
                **{key: value for key, value in special.items() if value is not None},
            }
            (tmp_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        if output_dir.exists():  # overwrite: rename cannot replace a non-empty directory, so move it aside
            old_dir = output_dir.with_name(f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(output_dir, old_dir)
            os.replace(tmp_dir, output_dir)
            shutil.rmtree(old_dir)
        else:
            os.replace(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return output_dir


def _load_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    if (model_dir / WEIGHTS_NAME).is_file():
        return load_file(model_dir / WEIGHTS_NAME)
    if (model_dir / WEIGHTS_INDEX_NAME).is_file():
        weight_map = json.loads((model_dir / WEIGHTS_INDEX_NAME).read_text())["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(load_file(model_dir / plain_name(shard, str(model_dir / WEIGHTS_INDEX_NAME))))
        return tensors
    raise FileNotFoundError(
        f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {model_dir}: raylm reads safetensors only, never "
        "pickled .bin files; convert with transformers: from_pretrained(...).save_pretrained(dir)"
    )


def import_hf(model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> LLMModel:
    """Build an LLMModel (on CPU, in `dtype`) from a Hugging Face Llama directory holding
    config.json and safetensors weights, e.g. one written by export_hf or save_pretrained."""
    model_dir = Path(model_dir)
    config = config_from_hf(json.loads((model_dir / "config.json").read_text()))
    state = {name: tensor.to(dtype) for name, tensor in hf_to_state_dict(_load_hf_weights(model_dir), config).items()}
    # Build on the meta device and adopt the loaded tensors, rather than allocating and randomly
    # initialising every weight only to overwrite it.
    with torch.device("meta"):
        model = LLMModel(config)
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:  # assign=True gave the two names separate Parameters: share one again
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.to_empty(device="cpu")
    model.rotary.reset_parameters()
    return model
