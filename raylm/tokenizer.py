"""Tokenizers: byte-level BPE, WordPiece and tiktoken, trained on a sample or loaded from a file.

    raylm prepare --input_dir ./raw_text_data --output_dir ./processed_data --tokenizer_type bpe
    raylm prepare ... --tokenizer_type tiktoken                              # a BPE trained here, saved for tiktoken
    raylm prepare ... --tokenizer_type tiktoken --tiktoken_encoding cl100k_base   # OpenAI's, from the local cache

    tok = load_tokenizer("./processed_data")        # a dataset folder, or the tokenizer file itself
    ids = tok.encode("Hello world")
    text = tok.decode(ids)

Every kind has two special tokens: an end-of-text token placed between documents and a padding
token (tiktoken's named encodings have no padding token; they pad with end-of-text, which the
`length` column masks anyway). `encode` never produces special tokens from text: a document
that contains the string "<|endoftext|>" is encoded as ordinary characters.

The byte-level BPE is trained by Hugging Face tokenizers and saved as tokenizer.json (loadable by
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)`), but encoded by tiktoken built from
the same merges: with the same GPT-2 split pattern and the byte-to-character mapping undone,
tiktoken gives the same ids several times faster (about 14 against 2 MB/s per thread).
`load_tokenizer` checks that the file is a plain byte-level BPE first, and encodes with
Hugging Face otherwise.
"""
from __future__ import annotations

import base64
import codecs
import hashlib
import json
import os
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import tiktoken
from tiktoken_ext import openai_public

from raylm import storage
from raylm.config import ConfigError
from raylm.runtime import cpu_count

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "[UNK]"  # WordPiece only: a word it cannot spell
GPT2_PATTERN = openai_public.r50k_pat_str  # the split pattern of GPT-2's (and our) byte-level BPE
HF_FILE = "tokenizer.json"
TIKTOKEN_FILE = "tokenizer.tiktoken"
TIKTOKEN_SIDECAR = "tokenizer.tiktoken.json"  # split pattern and special tokens of the ranks file
# tiktoken's named encodings raylm can load offline (gpt2 has the same ranks as r50k_base).
TIKTOKEN_NAMES = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RaylmTokenizer:
    """One interface over the three kinds. Build it with `load_tokenizer` or `train_tokenizer`.

    kind: "bpe" | "wordpiece" | "tiktoken". backend: what encodes, "tiktoken" or "hf" (Hugging
    Face). byte_level: tokens are byte strings (bpe, tiktoken), so `token_bytes` works."""

    def __init__(self, kind: str, path: Path, *, hf=None, enc: tiktoken.Encoding | None = None,
                 backend: str = "tiktoken", eos_token: str = EOS_TOKEN, pad_token: str = PAD_TOKEN):
        self.kind = kind
        self.path = Path(path)
        self.sha256 = sha256_file(path)
        self._hf = hf
        self._enc = enc  # decodes whenever present; encodes when backend == "tiktoken"
        self.backend = backend if enc is not None else "hf"
        self.byte_level = enc is not None
        if hf is not None:
            hf.encode_special_tokens = True  # "<|endoftext|>" typed in a document is plain text
            self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
            self.eos_token_id = hf.token_to_id(eos_token)
            self.pad_token_id = hf.token_to_id(pad_token)
        else:
            self.vocab_size = enc.n_vocab
            self.eos_token_id = enc.encode_single_token(eos_token)
            self.pad_token_id = enc.encode_single_token(pad_token)

    def __repr__(self) -> str:
        return (f"RaylmTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, backend={self.backend!r}, "
                f"path={str(self.path)!r})")

    def files(self) -> list[Path]:
        """The files that make up this tokenizer (tiktoken's has a sidecar of special tokens)."""
        return [self.path] + ([self.path.with_name(TIKTOKEN_SIDECAR)] if self.kind == "tiktoken" else [])

    def encode(self, text: str) -> list[int]:
        if self.backend == "tiktoken":
            return self._enc.encode_ordinary(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.backend == "tiktoken":
            return self._enc.encode_ordinary_batch(texts, num_threads=cpu_count())
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """encode(text) as a uint32 array, without building a Python list (the fast path of prepare)."""
        if self.backend == "tiktoken":
            return self._enc.encode_to_numpy(text, disallowed_special=())
        return np.asarray(self._hf.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (byte-level kinds only): a piece of a UTF-8 character, maybe."""
        if not self.byte_level:
            raise ValueError(f"{self.kind} tokens are not byte strings")
        return self._enc.decode_single_token_bytes(token_id)

    def decode(self, ids) -> str:
        """Text of `ids`; bytes that do not complete a UTF-8 character become U+FFFD."""
        ids = [int(i) for i in ids]
        if self._enc is not None:
            return self._enc.decode_bytes(ids).decode("utf-8", errors="replace")
        return self._hf.decode(ids, skip_special_tokens=False)


class StreamDecoder:
    """Turns token ids into text as they arrive, yielding only complete characters.

        stream = StreamDecoder(tok)
        for token_id in generated:
            print(stream.push(token_id), end="", flush=True)
        print(stream.flush())
    """

    def __init__(self, tokenizer: RaylmTokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        if self.tokenizer.byte_level:
            return self._utf8.decode(self.tokenizer.token_bytes(int(token_id)))
        # WordPiece joins pieces with spaces and "##": decode everything, emit what is new.
        self._ids.append(int(token_id))
        text = self.tokenizer.decode(self._ids)
        new = text[len(self._emitted):] if text.startswith(self._emitted) else ""
        self._emitted = text
        return new

    def flush(self) -> str:
        """Whatever is left (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True) if self.tokenizer.byte_level else ""


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def train_tokenizer(kind: str, texts: list[str], *, vocab_size: int, min_frequency: int,
                    out_dir: str | os.PathLike) -> RaylmTokenizer:
    """Train a tokenizer of `kind` on `texts` (a bounded sample) and save it in out_dir."""
    out_dir = Path(out_dir)
    if kind == "wordpiece":
        hf = _train_wordpiece(texts, vocab_size, min_frequency)
        storage.atomic_write_text(out_dir / HF_FILE, hf.to_str())
        return load_tokenizer(out_dir / HF_FILE)
    if kind not in ("bpe", "tiktoken"):
        raise ConfigError(f"tokenizer_type {kind!r} is not one of bpe, wordpiece, tiktoken")
    hf = _train_byte_level_bpe(texts, vocab_size, min_frequency)
    if kind == "bpe":
        storage.atomic_write_text(out_dir / HF_FILE, hf.to_str())
        return load_tokenizer(out_dir / HF_FILE)
    # tiktoken: the same BPE, renumbered densely (bytes 0-255, then merges in order, then specials)
    ranks = _byte_level_ranks(json.loads(hf.to_str()))
    if ranks is None:
        raise RuntimeError("the trained BPE cannot be expressed as tiktoken ranks")
    merged = sorted((token for token in ranks if len(token) > 1), key=ranks.__getitem__)
    dense = {token: i for i, token in enumerate([bytes([b]) for b in range(256)] + merged)}
    specials = {EOS_TOKEN: len(dense), PAD_TOKEN: len(dense) + 1}
    return _save_tiktoken(out_dir, "raylm-trained", GPT2_PATTERN, dense, specials, EOS_TOKEN, PAD_TOKEN)


def _train_byte_level_bpe(texts: list[str], vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte, so nothing is unknown
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _train_wordpiece(texts: list[str], vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[EOS_TOKEN, PAD_TOKEN, UNK_TOKEN])
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _byte_level_ranks(spec: dict) -> dict[bytes, int] | None:
    """tiktoken ranks (token bytes -> id) equivalent to a Hugging Face tokenizer.json, or None if
    it is not a plain byte-level BPE (then only Hugging Face can encode it exactly).

    Equivalent means: no normalizer, GPT-2's split pattern, every token spelled in GPT-2's
    byte alphabet, and merges whose results have increasing ids (tiktoken merges by the rank of
    the merged token, Hugging Face by the rank of the merge; these agree when they increase
    together)."""
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    if (model.get("type") != "BPE" or spec.get("normalizer") is not None or model.get("dropout")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or model.get("byte_fallback") or model.get("ignore_merges")
            or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True)):
        return None
    added = {t["content"] for t in spec.get("added_tokens", [])}
    vocab: dict[str, int] = model["vocab"]
    ranks: dict[bytes, int] = {}
    for token, token_id in vocab.items():
        if token in added:
            continue
        if any(c not in UNICODE_TO_BYTE for c in token):
            return None
        ranks[bytes(UNICODE_TO_BYTE[c] for c in token)] = token_id
    if len(ranks) != len(set(ranks.values())) or any(bytes([b]) not in ranks for b in range(256)):
        return None
    previous = -1
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged_id = vocab.get(left + right)
        if merged_id is None or merged_id <= previous:
            return None
        previous = merged_id
    return ranks


# ---------------------------------------------------------------------------------------------
# tiktoken files
# ---------------------------------------------------------------------------------------------

def _save_tiktoken(out_dir: Path, name: str, pat_str: str, ranks: dict[bytes, int], specials: dict[str, int],
                   eos_token: str, pad_token: str) -> RaylmTokenizer:
    """Write tokenizer.tiktoken (tiktoken's own "base64-token rank" lines) and its sidecar."""
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in by_rank]
    sidecar = {"name": name, "pat_str": pat_str, "special_tokens": specials,
               "eos_token": eos_token, "pad_token": pad_token}
    storage.atomic_write_json(out_dir / TIKTOKEN_SIDECAR, sidecar)
    storage.atomic_write_text(out_dir / TIKTOKEN_FILE, "".join(lines))
    return load_tokenizer(out_dir / TIKTOKEN_FILE)


def _parse_tiktoken_ranks(data: bytes) -> dict[bytes, int]:
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


def tiktoken_cache_dir() -> str:
    """Where tiktoken keeps downloaded encodings (the same rule as tiktoken.load)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def named_tiktoken(name_or_file: str, out_dir: str | os.PathLike) -> RaylmTokenizer:
    """One of OpenAI's encodings, from a local .tiktoken file or tiktoken's cache (never the
    network), saved into out_dir so the dataset carries its own tokenizer."""
    local_file = name_or_file if name_or_file.endswith(".tiktoken") else None
    name = Path(name_or_file).stem if local_file else name_or_file
    name = "r50k_base" if name == "gpt2" else name
    if name not in TIKTOKEN_NAMES:
        raise ConfigError(f"tiktoken_encoding {name_or_file!r}: use one of {', '.join(TIKTOKEN_NAMES)}, or a "
                          "file named after its encoding, e.g. ./cl100k_base.tiktoken")

    def read_ranks(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if local_file:
            if not os.path.isfile(local_file):
                raise ConfigError(f"tiktoken_encoding: file {local_file!r} does not exist")
            return _parse_tiktoken_ranks(Path(local_file).read_bytes())
        cached = os.path.join(tiktoken_cache_dir(), hashlib.sha1(url.encode()).hexdigest())
        if not os.path.isfile(cached):
            raise ConfigError(
                f"tiktoken encoding {name_or_file!r} is not on this machine and raylm does not download it. "
                f"Save {url} as {cached} (or set TIKTOKEN_CACHE_DIR to a folder holding it), or pass "
                f"--tiktoken_encoding /path/to/{name}.tiktoken")
        data = Path(cached).read_bytes()
        if expected_hash and hashlib.sha256(data).hexdigest() != expected_hash:
            raise ConfigError(f"{cached} is not {url} (sha256 differs): delete it and save the file again")
        return _parse_tiktoken_ranks(data)

    # tiktoken's constructor is the one source of each encoding's split pattern and special
    # tokens; it would fetch the ranks itself, so hand it the ranks read above instead.
    with mock.patch.object(openai_public, "load_tiktoken_bpe", read_ranks):
        spec = getattr(openai_public, name)()
    return _save_tiktoken(Path(out_dir), spec["name"], spec["pat_str"], spec["mergeable_ranks"],
                          spec["special_tokens"], EOS_TOKEN, EOS_TOKEN)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_tokenizer(path: str | os.PathLike, backend: str | None = None) -> RaylmTokenizer:
    """A tokenizer from tokenizer.json, tokenizer.tiktoken, or a prepared dataset folder (whose
    metadata.json names the file). backend="hf" makes a byte-level BPE encode with Hugging Face."""
    path = Path(path)
    if path.is_dir():
        meta_path = path / "metadata.json"
        if meta_path.is_file():
            meta = storage.read_json(meta_path)
            name = storage.plain_name(meta.get("tokenizer_file"), str(meta_path))
            return load_tokenizer(path / name, backend or meta.get("tokenizer_backend"))
        candidates = [path / f for f in (HF_FILE, TIKTOKEN_FILE) if (path / f).is_file()]
        if not candidates:
            raise FileNotFoundError(f"{path} holds no metadata.json, {HF_FILE} or {TIKTOKEN_FILE}: "
                                    "run `raylm prepare` first, or pass the tokenizer file")
        path = candidates[0]
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    if path.suffix == ".tiktoken":
        sidecar = storage.read_json(path.with_name(TIKTOKEN_SIDECAR))
        enc = tiktoken.Encoding(sidecar["name"], pat_str=sidecar["pat_str"],
                                mergeable_ranks=_parse_tiktoken_ranks(path.read_bytes()),
                                special_tokens=sidecar["special_tokens"])
        return RaylmTokenizer("tiktoken", path, enc=enc, eos_token=sidecar["eos_token"], pad_token=sidecar["pad_token"])

    from tokenizers import Tokenizer

    text = path.read_text(encoding="utf-8")
    spec = json.loads(text)
    hf = Tokenizer.from_str(text)
    if spec["model"]["type"] == "WordPiece":
        return RaylmTokenizer("wordpiece", path, hf=hf)
    ranks = _byte_level_ranks(spec)
    enc = None
    if ranks is not None:
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        enc = tiktoken.Encoding(path.stem, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return RaylmTokenizer("bpe", path, hf=hf, enc=enc, backend=backend or "tiktoken")
