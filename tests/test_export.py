"""Hugging Face export/import: logits parity with transformers.LlamaForCausalLM, offline."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import raylm.export
from raylm.export import config_from_hf, export_hf, import_hf, state_dict_to_hf
from raylm.model import LLMModel, ModelConfig

VOCAB = 97

CONFIGS = {
    "mha-tied": dict(num_heads=4, num_kv_heads=None, tie_embeddings=True),
    "gqa-untied": dict(num_heads=4, num_kv_heads=2, tie_embeddings=False),
    "mqa-odd-mlp": dict(num_heads=8, num_kv_heads=1, intermediate_size=77, tie_embeddings=False),
    "gqa-tied-theta": dict(num_heads=2, num_kv_heads=1, rope_theta=500000.0, norm_eps=1e-6, num_layers=3),
}


def random_model(seed: int = 0, **overrides) -> LLMModel:
    """A model whose every weight (norm gains included) is random, so no mapping error can hide."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=64)
    torch.manual_seed(seed)
    model = LLMModel(ModelConfig(**{**fields, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def random_tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", CONFIGS)
def test_exported_model_loads_in_transformers_with_identical_logits(tmp_path, name):
    model = random_model(**CONFIGS[name])
    out = export_hf(model, tmp_path / "hf", eos_token_id=3, pad_token_id=0, bos_token_id=1)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["num_key_value_heads"] == model.config.num_kv_heads
    assert config["intermediate_size"] == model.config.intermediate_size
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": model.config.rope_theta}
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": 3, "pad_token_id": 0}

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf, LlamaForCausalLM) and hf.dtype == torch.float32
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings
    x = random_tokens(2, 40)
    with torch.no_grad():
        logits, _ = model(x)
        torch.testing.assert_close(hf(x).logits, logits, rtol=0, atol=1e-4)
        # The same greedy continuation: positions and caching agree too.
        expected = model.generate(x[:, :6], max_new_tokens=10, temperature=0)
        hf_tokens = hf.generate(x[:, :6], max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                attention_mask=torch.ones_like(x[:, :6]))
    assert torch.equal(hf_tokens, expected)


@pytest.mark.parametrize("name", CONFIGS)
def test_import_of_an_export_round_trips_exactly(tmp_path, name):
    model = random_model(**CONFIGS[name])
    imported = import_hf(export_hf(model, tmp_path / "hf"))
    assert imported.config == model.config
    assert imported.state_dict().keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(imported.state_dict()[key], tensor), key
    assert (imported.lm_head.weight is imported.embed_tokens.weight) == model.config.tie_embeddings
    assert imported.num_params() == model.num_params()
    x = random_tokens(2, 16)
    torch.testing.assert_close(imported(x)[0], model(x)[0], rtol=0, atol=0)
    assert torch.equal(imported.rotary.cos, model.rotary.cos)


def test_bf16_export_stores_bf16_weights(tmp_path):
    model = random_model()
    out = export_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    imported = import_hf(out)  # back to fp32 by default
    assert imported.embed_tokens.weight.dtype == torch.float32
    torch.testing.assert_close(imported.embed_tokens.weight, model.embed_tokens.weight.bfloat16().float())


@pytest.mark.parametrize("tie", [False, True])
def test_import_of_a_model_saved_by_transformers(tmp_path, tie):
    torch.manual_seed(0)
    hf_config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        rope_theta=20000.0,  # transformers 5 moves it into rope_parameters, 4.x keeps it top-level
    )
    hf = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")

    model = import_hf(tmp_path / "hf")
    assert model.config.rope_theta == 20000.0 and model.config.max_seq_len == 128
    assert model.config.tie_embeddings == tie and model.config.intermediate_size == 96
    x = random_tokens(2, 30)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], hf(x).logits, rtol=0, atol=1e-4)


def test_import_reads_sharded_safetensors(tmp_path):
    model = random_model(tie_embeddings=False)
    hf = AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "hf"))
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    imported = import_hf(tmp_path / "sharded")
    for key, tensor in model.state_dict().items():
        assert torch.equal(imported.state_dict()[key], tensor), key


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}}, "rope scaling"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "mistral"}, "only 'llama'"),
    ({"head_dim": 32}, "head_dim 32"),
])
def test_import_refuses_unsupported_configs(change, message):
    hf_config = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
                 "num_hidden_layers": 2, "num_attention_heads": 4}
    config_from_hf(hf_config)  # the base is importable
    with pytest.raises(ValueError, match=message):
        config_from_hf({**hf_config, **change})


def test_import_never_unpickles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(raylm.export.config_to_hf(random_model().config)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        import_hf(tmp_path)


def test_state_dict_to_hf_names_wrapper_prefixes():
    model = random_model()
    wrapped = {"_orig_mod." + key: value for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="strip the 'module.' / '_orig_mod.' prefixes"):
        state_dict_to_hf(wrapped, model.config)


def test_state_dict_to_hf_accepts_a_deduplicated_tied_checkpoint():
    model = random_model(tie_embeddings=True)
    state = {key: value for key, value in model.state_dict().items() if key != "embed_tokens.weight"}
    hf = state_dict_to_hf(state, model.config)
    assert "lm_head.weight" not in hf and torch.equal(hf["model.embed_tokens.weight"], model.embed_tokens.weight)


def build_tokenizer(directory) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    text = ["the quick brown fox jumps over the lazy dog", "a tiny tokenizer for a tiny model"] * 20
    tokenizer.train_from_iterator(text, trainer=trainer)
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    return tokenizer


def test_tokenizer_files_load_with_auto_tokenizer(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tok")
    out = export_hf(random_model(), tmp_path / "hf", tmp_path / "tok", eos_token="</s>", pad_token="<pad>",
                    bos_token_id=2)

    loaded = AutoTokenizer.from_pretrained(out)
    assert (loaded.eos_token, loaded.eos_token_id) == ("</s>", 3)
    assert (loaded.pad_token, loaded.pad_token_id) == ("<pad>", 0)
    assert (loaded.bos_token, loaded.bos_token_id) == ("<s>", 2)
    text = "the lazy fox"
    assert loaded(text)["input_ids"] == tokenizer.encode(text).ids
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (3, 0, 2)


def test_special_tokens_are_checked_against_the_tokenizer(tmp_path):
    build_tokenizer(tmp_path / "tok")
    with pytest.raises(ValueError, match="eos_token '<eot>' is not in the tokenizer's vocabulary"):
        export_hf(random_model(), tmp_path / "a", tmp_path / "tok", eos_token="<eot>")
    with pytest.raises(ValueError, match="eos_token '</s>' has id 3, but eos_token_id is 5"):
        export_hf(random_model(), tmp_path / "b", tmp_path / "tok", eos_token="</s>", eos_token_id=5)
    with pytest.raises(ValueError, match=r"has \d+ tokens but the model only 50 embeddings"):
        export_hf(random_model(vocab_size=50), tmp_path / "c", tmp_path / "tok")
    with pytest.raises(ValueError, match="need a tokenizer_dir"):
        export_hf(random_model(), tmp_path / "d", eos_token="</s>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(raylm.export, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(random_model(), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_export_into_a_path_whose_parent_is_a_file_fails_cleanly(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        export_hf(random_model(), tmp_path / "file" / "hf")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_existing_export_is_replaced_only_with_overwrite(tmp_path):
    first, second = random_model(seed=0), random_model(seed=1)
    export_hf(first, tmp_path / "hf")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_hf(second, tmp_path / "hf")
    export_hf(second, tmp_path / "hf", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    assert torch.equal(import_hf(tmp_path / "hf").norm.weight, second.norm.weight)
