"""`raylm generate`: text from a checkpoint, printed as it is sampled.

    raylm generate --checkpoint ./checkpoints/final --prompt "Once upon a time" --max_new_tokens 200
    raylm generate --checkpoint ./checkpoints/final            # interactive: type a prompt, get text

Sampling uses the model's KV cache, stops at end-of-text, and is reproducible for a --seed.
"""
from __future__ import annotations

import sys
from typing import Iterator

import torch

from raylm.config import ConfigError, GenerateConfig


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from raylm.train import _no_cuda_message

        raise ConfigError(_no_cuda_message().replace("--use_gpu", "--device cuda"))
    return torch.device(name)


def stream_text(loaded, prompt: str, cfg: GenerateConfig, generator: torch.Generator) -> Iterator[str]:
    """Pieces of text as tokens are sampled (whole characters only), for one sample."""
    from raylm.tokenizer import StreamDecoder

    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    ids = tok.encode(prompt) if prompt else []
    if not ids:  # an empty prompt starts after an end-of-text, like the start of a document
        ids = [tok.eos_token_id]
    limit = model.config.max_seq_len
    if len(ids) >= limit:
        ids = ids[-(limit - 1):]  # keep the end of a prompt longer than the context
    max_new = min(cfg.max_new_tokens, limit - len(ids))
    decoder = StreamDecoder(tok)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    for token in model.stream_tokens(x, max_new, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                     eos_token_id=tok.eos_token_id, generator=generator):
        token_id = int(token[0])
        if token_id == tok.eos_token_id:
            break
        piece = decoder.push(token_id)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


def generate_text(cfg: GenerateConfig, prompt: str, loaded=None) -> list[str]:
    """num_samples completions of prompt (without the prompt). Deterministic for cfg.seed."""
    from raylm.evaluate import load_checkpoint

    loaded = loaded or load_checkpoint(cfg.checkpoint, pick_device(cfg.device))
    if loaded.tokenizer is None:
        raise ConfigError(f"{loaded.path} carries no tokenizer file, so text cannot be generated from it")
    device = next(loaded.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return ["".join(stream_text(loaded, prompt, cfg, generator)) for _ in range(cfg.num_samples)]


def run(cfg: GenerateConfig) -> list[str]:
    """The command: print each sample as it streams; interactive when there is no prompt."""
    from raylm.evaluate import load_checkpoint

    loaded = load_checkpoint(cfg.checkpoint, pick_device(cfg.device))
    if loaded.tokenizer is None:
        raise ConfigError(f"{loaded.path} carries no tokenizer file, so text cannot be generated from it")
    device = next(loaded.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out = []

    def one_prompt(prompt: str) -> None:
        for i in range(cfg.num_samples):
            if cfg.num_samples > 1:
                print(f"--- sample {i + 1} ---")
            sys.stdout.write(prompt)
            pieces = []
            for piece in stream_text(loaded, prompt, cfg, generator):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            out.append("".join(pieces))

    if cfg.prompt is not None:
        one_prompt(cfg.prompt)
        return out
    print(f"raylm generate: {loaded.path} (step {loaded.state.get('step')}). Type a prompt and press Enter; "
          "an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            break
        if not prompt.strip():
            break
        one_prompt(prompt)
    return out
