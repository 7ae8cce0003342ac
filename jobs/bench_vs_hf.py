"""Training throughput on this machine's CPU: raylm's LLMModel against transformers' LlamaForCausalLM.

    python jobs/bench_vs_hf.py                       # tiny and small-ish, eager and compiled: ~4-9 min, 2 cores
    python jobs/bench_vs_hf.py --sizes tiny --modes eager --windows 9
    python jobs/bench_vs_hf.py --sizes small-ish --modes eager --profile_steps 3   # and where the time goes
    python jobs/bench_vs_hf.py --smoke               # seconds; what the tests run
    RAYLM_FUSED_CPU_KERNELS=0 python jobs/bench_vs_hf.py --sizes small-ish --modes eager  # raylm without its C++ kernels
    python jobs/bench_cpu_kernels.py                 # raylm alone, its kernels on and off: the A/B

Both models get the same shapes (raylm.export.config_to_hf turns the raylm config into the
LlamaConfig: hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings, rope theta,
eps), the same weights (raylm's, mapped with raylm.export.state_dict_to_hf), the same random
tokens, batch and sequence length, and the same plain loop: forward with labels=input_ids (each
model shifts the labels itself and computes the loss in fp32), backward, clip_grad_norm_(1.0),
AdamW.step(), zero_grad(set_to_none=True). fp32, no autocast, dropout 0 (--precisions bf16: both
forward passes under CPU autocast to bf16, as `raylm train --mixed_precision bf16` runs; on CPUs with
Intel AMX its matrix products run in hardware, several times faster than fp32). raylm's side runs as
`raylm train` does on CPU: its loss computed in chunks without materialising the logits
(LLMModel's return_logits=False), AdamW's fused kernel, and glibc's malloc told to keep the memory
a step frees (raylm.runtime.keep_freed_memory); transformers' side is the plain AdamW
loop of the issue (torch's default AdamW, the loss from full logits). Hugging Face runs with
attn_implementation="sdpa" (its default) and use_cache=False (a training loop keeps no KV cache).
"compiled" is torch.compile(model) with default settings for both.

Each model trains in a process of its own (--isolation process, the default), as `raylm train` and
a user's own transformers script would. The two models' timing windows alternate (raylm, HF, HF,
raylm, ...), one process running while the other waits, so a busy moment of a shared machine hits
both alike; tokens/sec is the median over the windows after warm-up (and after compilation), and
the ratio is raylm's median over HF's. --isolation shared runs both in this one process instead,
where each model's allocations change the other's, and where raylm's malloc setting applies to
both: by default glibc hands large freed blocks back to the kernel, and the next step page-faults
to map them again (the "faults/step" column counts them).
Because other work on a shared machine comes and goes, three steadier ratios are printed next to
the median: the median of the ratios of adjacent windows ("paired"), the ratio of each model's
fastest window ("best"), and the ratio of tokens per CPU-second of each model's process ("per
CPU-s"; --threads 1 also removes the threads' waits on each other). The first loss of both models
is printed: equal weights give equal losses, which checks that the two really are the same model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raylm.export import config_to_hf, state_dict_to_hf  # noqa: E402
from raylm.model import LLMModel, ModelConfig  # noqa: E402
from raylm.storage import atomic_write_text  # noqa: E402

# Shapes of the two benchmark models; batch and seq are the training batch (sequences x tokens).
SIZES = {
    "tiny": dict(model=dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=8000),
                 batch=8, seq=256),
    "small-ish": dict(model=dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, vocab_size=8000),
                      batch=8, seq=256),
    "smoke": dict(model=dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=128),
                  batch=2, seq=16),
}


def build_pair(size: dict, seed: int = 0):
    """(raylm model, HF model) with identical shapes and weights, in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = ModelConfig(**size["model"], max_seq_len=size["seq"], dropout=0.0)
    torch.manual_seed(seed)
    ours = LLMModel(config).train()
    hf_config = LlamaConfig(**config_to_hf(config), attn_implementation="sdpa")
    hf_config.use_cache = False
    hf = LlamaForCausalLM(hf_config).train()
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(ours.state_dict(), config), strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_embeddings else set()):
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    if config.tie_embeddings:  # the tied lm_head is the embedding (its own name is not in the state dict)
        hf.tie_weights()
    return ours, hf


def make_step(model: torch.nn.Module, is_hf: bool, compile_model: bool, precision: str = "fp32"):
    """One training step of the plain loop, as a function of the batch; returns the loss tensor."""
    from raylm.train import chunked_loss_head, fused_adamw

    cpu = torch.device("cpu")
    runner = torch.compile(model) if compile_model else model
    # raylm's loop as `raylm train` runs it on CPU: fused AdamW, the loss computed in chunks;
    # transformers' the plain AdamW loop
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1,
                                  fused=False if is_hf else fused_adamw(cpu))

    def step(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if is_hf:
                loss = runner(input_ids=ids, labels=ids).loss
            else:
                _, loss = runner(ids, labels=ids, return_logits=not chunked_loss_head(cpu))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def _batches(size: dict) -> list[torch.Tensor]:
    """The same four random batches for both models (and in every process)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, size["model"]["vocab_size"], (size["batch"], size["seq"]), generator=gen)
            for _ in range(4)]


def _minor_faults() -> int:
    """Minor page faults of this process so far: each is a fresh page the kernel had to map (and zero)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Trainer:
    """One model's training loop in this process: warm-up, then timed windows of steps."""

    def __init__(self, size_name: str, which: str, compile_model: bool, threads: int | None = None,
                 precision: str = "fp32"):
        if threads:
            torch.set_num_threads(threads)
        if which == "raylm":  # as `raylm train` sets up a CPU run (process-wide: in --isolation shared, HF's too)
            from raylm.runtime import keep_freed_memory

            keep_freed_memory()
        size = SIZES[size_name]
        ours, hf = build_pair(size)
        self.params = ours.num_params()
        model = ours if which == "raylm" else hf
        del ours, hf
        self.batches = _batches(size)
        self.step = make_step(model, which == "hf", compile_model, precision)

    def warm(self, steps: int) -> dict:
        t = time.perf_counter()
        first_loss = None
        for i in range(steps):  # compilation happens here: not timed into tokens/sec
            loss = self.step(self.batches[i % len(self.batches)])
            if i == 0:
                first_loss = float(loss.detach())
        return {"first_loss": first_loss, "warmup_s": time.perf_counter() - t, "params": self.params}

    def window(self, steps: int) -> tuple[float, float, int]:
        """(wall seconds, CPU seconds of this process, minor page faults) of `steps` training steps."""
        t, cpu, faults = time.perf_counter(), time.process_time(), _minor_faults()
        for i in range(steps):
            loss = self.step(self.batches[i % len(self.batches)])
        float(loss.detach())  # the window ends when its last step has finished
        return time.perf_counter() - t, time.process_time() - cpu, _minor_faults() - faults

    def profile(self, steps: int) -> list[str]:
        """Where `steps` more steps spend their time (torch.profiler): raylm.profiling's summary lines."""
        from torch.profiler import ProfilerActivity, profile

        from raylm.profiling import summarize

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                loss = self.step(self.batches[i % len(self.batches)])
            float(loss.detach())
        return summarize(prof, torch.device("cpu"), steps)


def _serve(conn, size_name: str, which: str, compile_model: bool, threads: int | None,
           precision: str = "fp32") -> None:
    """A worker process's loop: builds one model, then runs what the parent asks, one request at a time."""
    import traceback

    try:
        trainer = _Trainer(size_name, which, compile_model, threads, precision)
        conn.send(("ok", None))
        while True:
            request, steps = conn.recv()
            if request == "stop":
                return
            conn.send(("ok", getattr(trainer, request)(steps)))
    except Exception:  # the parent raises it with the worker's traceback
        conn.send(("error", traceback.format_exc()))


class _InProcess:
    def __init__(self, *args):
        self.trainer = _Trainer(*args)

    def __call__(self, request: str, steps: int):
        return getattr(self.trainer, request)(steps)

    def close(self):
        del self.trainer


class _OwnProcess:
    """The same trainer in a process of its own (spawned: no state shared with the parent or the other model)."""

    def __init__(self, *args):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()
        self._reply()

    def _reply(self):
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):  # the pipe closed or was reset: the worker is gone
            self._died()
        if status == "error":
            raise RuntimeError(f"the benchmark's worker process failed:\n{value}")
        return value

    def _died(self):
        self.proc.join(timeout=10)
        raise RuntimeError(f"the benchmark's worker process died (exit code {self.proc.exitcode}; -9 is a kill, "
                           "e.g. by the kernel's out-of-memory killer)") from None

    def __call__(self, request: str, steps: int):
        try:
            self.conn.send((request, steps))
        except OSError:
            self._died()
        return self._reply()

    def close(self):
        try:
            self.conn.send(("stop", 0))
        except OSError:  # the worker has died already (BrokenPipeError)
            pass
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=10)
        self.conn.close()


def measure_pair(size_name: str, compile_model: bool, *, warmup_steps: int, windows: int, steps_per_window: int,
                 isolation: str = "process", threads: int | None = None, profile_steps: int = 0,
                 precision: str = "fp32") -> dict:
    """Warm tokens/sec of raylm and HF on one size and mode, timing windows interleaved; each model in
    a process of its own, or both in this one (isolation, see the module's docstring). profile_steps > 0:
    then that many steps of each model under torch.profiler, after the timed windows (result["profile"])."""
    runner = _OwnProcess if isolation == "process" else _InProcess
    size = SIZES[size_name]
    runners = {}
    try:
        for name in ("raylm", "hf"):  # inside the try: a second one that fails to start closes the first
            runners[name] = runner(size_name, name, compile_model, threads, precision)
        warm = {name: run("warm", warmup_steps) for name, run in runners.items()}  # one after the other
        tokens = size["batch"] * size["seq"] * steps_per_window
        tps: dict[str, list[float]] = {name: [] for name in runners}
        cpu_tps: dict[str, list[float]] = {name: [] for name in runners}
        faults: dict[str, list[float]] = {name: [] for name in runners}
        for w in range(windows):
            for name in (("raylm", "hf") if w % 2 == 0 else ("hf", "raylm")):
                wall, cpu, flt = runners[name]("window", steps_per_window)
                tps[name].append(tokens / wall)
                cpu_tps[name].append(tokens / cpu)
                faults[name].append(flt / steps_per_window)
        profiles = {name: run("profile", profile_steps) for name, run in runners.items()} if profile_steps else {}
    finally:
        for run in runners.values():
            try:
                run.close()
            except Exception as e:  # closing one must not keep the other open, nor hide the first error
                print(f"bench_vs_hf: closing a worker failed: {e}", file=sys.stderr)
    result = {name: statistics.median(v) for name, v in tps.items()}
    result.update(ratio=result["raylm"] / result["hf"], windows=tps, isolation=isolation,
                  first_loss={name: w["first_loss"] for name, w in warm.items()},
                  warmup_s={name: w["warmup_s"] for name, w in warm.items()}, params=warm["raylm"]["params"],
                  cpu={name: statistics.median(v) for name, v in cpu_tps.items()},
                  page_faults_per_step={name: statistics.median(v) for name, v in faults.items()}, profile=profiles)
    result["cpu_ratio"] = result["cpu"]["raylm"] / result["cpu"]["hf"]
    result["paired_ratio"] = statistics.median(a / b for a, b in zip(tps["raylm"], tps["hf"]))  # adjacent windows
    result["best_ratio"] = max(tps["raylm"]) / max(tps["hf"])
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small-ish"], choices=[s for s in SIZES if s != "smoke"])
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--windows", type=int, default=7, help="timed windows per model (medians are taken)")
    p.add_argument("--steps_per_window", type=int, default=3)
    p.add_argument("--warmup_steps", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                   help="fp32 (the target's pairing); bf16: both models under CPU autocast to bf16. Both: raylm's "
                        "and transformers' bf16 / fp32 speed-ups are printed too")
    p.add_argument("--isolation", choices=["process", "shared"], default="process",
                   help="process: each model trains in a process of its own, as raylm and a user's own script would "
                        "(only one runs at a time); shared: both in this one process, where each one's allocations "
                        "change the other's page faults")
    p.add_argument("--profile_steps", type=int, default=0,
                   help="after the timed windows, profile this many more steps of each model (torch.profiler) and "
                        "print where their time goes: matrix multiplications, attention, optimizer, the rest")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run with a toy model")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.modes, args.windows, args.steps_per_window, args.warmup_steps = ["smoke"], ["eager"], 2, 1, 1
        args.profile_steps, args.precisions = 1, ["fp32", "bf16"]
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    load_before = os.getloadavg()[0]  # other work on a shared machine skews every figure below
    from raylm.cpu_kernels import describe_cpu_kernels

    results = {"device": f"CPU x{os.cpu_count()}", "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "transformers": transformers.__version__, "hf_attn_implementation": "sdpa", "isolation": args.isolation,
               "precisions": args.precisions,
               # what runs raylm's RMSNorm, SwiGLU and rotary embedding in eager mode, fp32 and bf16
               # (RAYLM_FUSED_CPU_KERNELS=0: the PyTorch-operator versions in fp32, PyTorch's operators in bf16;
               # compiled code always runs PyTorch's operators; jobs/bench_cpu_kernels.py is the A/B)
               "raylm_cpu_kernels": describe_cpu_kernels(),
               "runs": []}
    t0 = time.perf_counter()
    for size_name in args.sizes:
        for mode in args.modes:
            for precision in args.precisions:
                r = measure_pair(size_name, mode == "compiled", warmup_steps=args.warmup_steps, windows=args.windows,
                                 steps_per_window=args.steps_per_window, isolation=args.isolation,
                                 threads=args.threads, profile_steps=args.profile_steps, precision=precision)
                r.update(size=size_name, mode=mode, precision=precision)
                results["runs"].append(r)
                print(f"  {size_name:9s} {mode:8s} {precision} raylm {r['raylm']:>9,.0f}  hf {r['hf']:>9,.0f} "
                      f"tokens/s  ratio {r['ratio']:.3f}", file=sys.stderr, flush=True)
    results["wall_s"] = time.perf_counter() - t0
    results["load_average"] = [load_before, os.getloadavg()[0]]

    print("\n" + "=" * 78)
    print(f"bench_vs_hf: {results['device']} ({results['torch_threads']} torch threads), torch {torch.__version__}, "
          f"transformers {transformers.__version__}; HF attn_implementation=sdpa; "
          f"{' and '.join('fp32' if p == 'fp32' else 'bf16 autocast' for p in args.precisions)}; "
          f"{args.windows} interleaved windows of {args.steps_per_window} steps, medians; each model in "
          f"{'a process of its own' if args.isolation == 'process' else 'this one process'}; load average "
          f"{load_before:.1f} before, {results['load_average'][1]:.1f} after")
    print(f"raylm's RMSNorm, SwiGLU and rotary kernels in eager mode: {results['raylm_cpu_kernels']}")
    print(f"{'size':9s} {'mode':8s} {'prec':5s} {'params':>8s} {'tokens/step':>11s} {'raylm tok/s':>12s} "
          f"{'HF tok/s':>10s} {'raylm/HF':>8s} {'paired':>6s} {'best':>6s} {'per CPU-s':>9s} {'faults/step':>13s}  first loss raylm / HF")
    for r in results["runs"]:
        size = SIZES[r["size"]]
        print(f"{r['size']:9s} {r['mode']:8s} {r['precision']:5s} {r['params'] / 1e6:7.1f}M "
              f"{size['batch'] * size['seq']:>11,} {r['raylm']:>12,.0f} {r['hf']:>10,.0f} {r['ratio']:>8.3f} {r['paired_ratio']:>6.3f} "
              f"{r['best_ratio']:>6.3f} {r['cpu_ratio']:>9.3f} "
              f"{r['page_faults_per_step']['raylm']:>6,.0f}/{r['page_faults_per_step']['hf']:<6,.0f}  "
              f"{r['first_loss']['raylm']:.4f} / {r['first_loss']['hf']:.4f}")
    print("raylm/HF: of the median wall-clock tokens/s (the target); paired: median of the ratios of adjacent "
          "windows; best: of each model's fastest window; per CPU-s: of the median tokens per CPU-second of "
          "each model's process. On a machine other work shares, the last three move less than the first. "
          "faults/step: minor page faults per step, raylm/HF (fresh memory the kernel maps and zeroes: large "
          "tensors freed and allocated again each step).")
    for r in results["runs"]:
        for name, lines in r["profile"].items():
            print(f"{r['size']} {r['mode']} {r['precision']}, {'raylm' if name == 'raylm' else 'transformers'}: "
                  + lines[0])
            print("\n".join(lines[1:]))
    runs = {(r["size"], r["mode"], r["precision"]): r for r in results["runs"]}
    for (size_name, mode, precision), r in runs.items():  # bf16 against fp32, each model against itself
        fp32 = runs.get((size_name, mode, "fp32"))
        if precision == "bf16" and fp32:
            print(f"bf16 / fp32 tokens/s, {size_name} {mode}: raylm {r['raylm'] / fp32['raylm']:.2f}x, "
                  f"transformers {r['hf'] / fp32['hf']:.2f}x")
    target = [r for r in results["runs"] if r["precision"] == "fp32"]  # the issue's pairing is fp32
    met = {name: bool(target) and all(r[key] >= 1.1 for r in target) for name, key in (("median", "ratio"),
                                                                                     ("paired", "paired_ratio"))}
    print("target raylm >= 1.1x HF in every fp32 pairing: "
          + ", ".join(f"{'met' if ok else 'missed'} by the {name} ratio" for name, ok in met.items())
          + f" (wall {results['wall_s']:.0f} s)")
    print("=" * 78)
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2))  # never a half-written file
    return results


if __name__ == "__main__":
    main()
