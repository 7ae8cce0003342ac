"""The three tokenizer kinds: training, saving, loading, round trips, and tiktoken == Hugging Face."""
from __future__ import annotations

import base64
import hashlib
import json
import sysconfig
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raylm.config import ConfigError
from raylm.tokenizer import (EOS_TOKEN, PAD_TOKEN, StreamDecoder, load_tokenizer, named_tiktoken,
                             tiktoken_cache_dir, train_tokenizer)

VARIED = [
    "Hello, world! It's a test -- we'll see what's what.",
    "def f(x):\n    return x ** 2  # squares\n\n\n\tindented\r\nwindows line",
    "Numbers 1234567890 and 3.14159, dates 2024-01-02, ids x86_64.",
    "Ünïcödé: café, naïve, Straße, ÆØÅ, 中文字符, 日本語のテキスト, 한국어, العربية, עברית, हिन्दी",
    "Emoji 🎉🚀 and flags 🇫🇷, ZWJ 👩‍👩‍👧, skin 👍🏽, math ∑∫√∞ ≠ ≤ ≥",
    "   leading and trailing spaces   \n\n\n   ",
    "I'M SHOUTING, DON'T YOU'LL HE'D THEY'VE WE'RE",
    "tabs\t\tand\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "<|endoftext|> typed in a document is just text <|pad|>",
    "",
]


def training_texts() -> list[str]:
    """About 200 KB of real text: the standard library's own source, plus the samples above."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("[a-c]*.py"))[:12]]
    return texts + VARIED * 3


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    texts = training_texts()
    return {kind: train_tokenizer(kind, texts, vocab_size=400, min_frequency=2,
                                  out_dir=tmp_path_factory.mktemp(kind))
            for kind in ("bpe", "wordpiece", "tiktoken")}


def test_each_kind_is_saved_and_loads_back_identically(tokenizers):
    names = {"bpe": "tokenizer.json", "wordpiece": "tokenizer.json", "tiktoken": "tokenizer.tiktoken"}
    for kind, tok in tokenizers.items():
        assert tok.kind == kind and tok.path.name == names[kind]
        assert tok.vocab_size == 400
        assert tok.eos_token_id != tok.pad_token_id
        assert 0 <= tok.eos_token_id < tok.vocab_size and 0 <= tok.pad_token_id < tok.vocab_size
        assert tok.sha256 == hashlib.sha256(tok.path.read_bytes()).hexdigest()
        again = load_tokenizer(tok.path.parent)
        for text in VARIED:
            ids = tok.encode(text)
            assert again.encode(text) == ids
            assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.encode_batch(VARIED) == [tok.encode(t) for t in VARIED]
        assert [list(tok.encode_to_numpy(t)) for t in VARIED] == [tok.encode(t) for t in VARIED]


def test_special_tokens_in_text_are_plain_text(tokenizers):
    for tok in tokenizers.values():
        ids = tok.encode(f"a {EOS_TOKEN} b {PAD_TOKEN}")
        assert tok.eos_token_id not in ids and tok.pad_token_id not in ids


def test_bpe_encodes_with_tiktoken_and_matches_hugging_face(tokenizers):
    tok = tokenizers["bpe"]
    hf = load_tokenizer(tok.path, backend="hf")
    assert tok.backend == "tiktoken" and hf.backend == "hf"
    for text in VARIED + training_texts()[:3]:
        assert tok.encode(text) == hf.encode(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_byte_level_kinds_round_trip_any_unicode_and_agree_with_hugging_face(tokenizers, text):
    bpe, tik = tokenizers["bpe"], tokenizers["tiktoken"]
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert tik.decode(tik.encode(text)) == text
    assert ids == bpe._hf.encode(text, add_special_tokens=False).ids


def test_tiktoken_kind_is_the_same_bpe_with_dense_ranks(tokenizers):
    tik, bpe = tokenizers["tiktoken"], tokenizers["bpe"]
    lines = tik.path.read_text().splitlines()
    ranks = sorted(int(line.split()[1]) for line in lines)
    assert ranks == list(range(len(lines)))  # bytes, then merges, then the two special tokens
    assert (tik.eos_token_id, tik.pad_token_id) == (len(lines), len(lines) + 1)
    assert all(base64.b64decode(line.split()[0]) == bytes([i]) for i, line in enumerate(lines[:256]))
    for text in VARIED:  # same tokens, other numbers
        assert [tik.token_bytes(i) for i in tik.encode(text)] == [bpe.token_bytes(i) for i in bpe.encode(text)]


def test_hugging_face_kinds_load_in_transformers(tokenizers):
    transformers = pytest.importorskip("transformers")
    for kind in ("bpe", "wordpiece"):
        tok = tokenizers[kind]
        fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok.path))
        for text in VARIED[:5]:
            assert fast.encode(text, add_special_tokens=False) == tok.encode(text)


def test_wordpiece_decodes_words(tokenizers):
    tok = tokenizers["wordpiece"]
    assert tok.decode(tok.encode("return the value")) == "return the value"


def test_stream_decoder_yields_whole_characters_only(tokenizers):
    text = "Emoji 🎉🚀 中文字符 café 👩‍👩‍👧!"
    for kind in ("bpe", "tiktoken"):
        tok = tokenizers[kind]
        ids = tok.encode(text)
        assert len(ids) > len(text) / 2  # rare characters are split into byte pieces
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == text
        assert "\ufffd" not in "".join(pieces)
    broken = StreamDecoder(tokenizers["bpe"])
    first_byte_of_emoji = tokenizers["bpe"].encode("🎉")[0]
    assert broken.push(first_byte_of_emoji) == "" and broken.flush() == "\ufffd"
    words = StreamDecoder(tokenizers["wordpiece"])
    ids = tokenizers["wordpiece"].encode("return the value")
    assert "".join(words.push(i) for i in ids) == "return the value"


def test_partial_bytes_decode_to_replacement_characters(tokenizers):
    tok = tokenizers["bpe"]
    ids = tok.encode("🎉")
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode(ids) == "🎉"


def test_a_bpe_file_tiktoken_cannot_mirror_is_encoded_by_hugging_face(tokenizers, tmp_path):
    spec = json.loads(tokenizers["bpe"].path.read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    tok = load_tokenizer(path)
    assert tok.backend == "hf"
    assert tok.encode("HELLO") == tok.encode("hello")


def test_named_tiktoken_encoding_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as err:
        named_tiktoken("cl100k_base", tmp_path / "out")
    message = str(err.value)
    assert "cl100k_base.tiktoken" in message and tiktoken_cache_dir() in message
    with pytest.raises(ConfigError, match="use one of"):
        named_tiktoken("p51k", tmp_path / "out")


def test_named_tiktoken_encoding_from_a_local_file(tmp_path):
    """A stand-in ranks file (bytes and two merges) named after cl100k_base: the split pattern
    and special tokens come from tiktoken's definition of cl100k_base."""
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"the"]
    ranks_file = tmp_path / "cl100k_base.tiktoken"
    ranks_file.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    out = tmp_path / "out"
    out.mkdir()
    tok = named_tiktoken(str(ranks_file), out)
    assert tok.kind == "tiktoken" and tok.eos_token_id == 100257 and tok.pad_token_id == 100257
    assert tok.vocab_size == 100277
    assert tok.encode("the") == [257]
    assert load_tokenizer(out).encode("the then") == tok.encode("the then")
