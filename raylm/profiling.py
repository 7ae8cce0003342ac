"""`raylm train --profile_steps N`: torch.profiler over N training steps after warm-up, and where
the time went: a table of the slowest kernels (GPU) or operators (CPU), grouped into matrix
multiplications, attention, fused elementwise code, the optimizer and the rest."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

# name fragments -> category, first match wins (lower case). GPU kernel names: cuBLAS/CUTLASS GEMMs
# (gemm, sm90_xmma, nvjet, cutlass), FlashAttention (flash), cuDNN attention (cudnn, fmha), the
# memory-efficient kernel (fmha / efficient_attention), Triton kernels that inductor generates
# (triton_), AdamW's fused or foreach kernels (adam). CPU operators: aten::mm/addmm/bmm, SDPA, raylm's
# fused CPU kernels (raylm_cpu::), and compiled graphs ("## Call CompiledFxGraph ...": inductor's C++ kernels).
CATEGORIES = (
    ("fused elementwise (raylm's CPU kernels)", ("raylm_cpu::",)),  # raylm/csrc/fused_cpu.cpp
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul",
                "mkl")),
    ("optimizer and clipping", ("adam", "multi_tensor", "foreach")),
    ("fused elementwise (inductor/triton)", ("triton", "compiledfxgraph")),
)


def category(name: str) -> str:
    low = name.lower()
    for label, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return label
    return "other"


def profile_window(first_step: int, max_steps: int, steps: int, warm_steps: int) -> tuple[int, int] | None:
    """(first, last) profiled step: the last `steps` steps of the run, but never one of its first
    `warm_steps` (compilation, allocator warm-up). None when the run is too short or steps is 0."""
    if steps <= 0:
        return None
    start = max(max_steps - steps + 1, first_step + warm_steps + 1)
    end = min(start + steps - 1, max_steps)
    return (start, end) if start <= end else None


class StepProfiler:
    """Starts torch.profiler at the first step of the window and, after its last step, writes
    `kernels.txt` (the table) and `trace.json` (open it in chrome://tracing or Perfetto) into
    out_dir and returns the summary lines."""

    def __init__(self, window: tuple[int, int] | None, device: torch.device, out_dir: str | Path | None):
        self.window, self.device, self.out_dir = window, device, Path(out_dir) if out_dir else None
        self.prof = None

    @property
    def active(self) -> bool:
        return self.prof is not None

    def step_begins(self, step: int) -> None:
        if self.window and step == self.window[0]:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self.prof = profile(activities=activities)
            self.prof.start()

    def close(self) -> None:
        """Stop a profile left running (the run failed inside the window); nothing is written."""
        if self.prof is not None:
            self.prof.stop()
            self.prof = None

    def step_ends(self, step: int) -> list[str] | None:
        """The summary lines after the window's last step, else None."""
        if not self.active or step != self.window[1]:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prof.stop()
        lines = summarize(self.prof, self.device, self.window[1] - self.window[0] + 1)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = self.prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90)
            tmp = self.out_dir / "kernels.txt.tmp"
            tmp.write_text("\n".join(lines) + "\n\n" + table + "\n")
            tmp.replace(self.out_dir / "kernels.txt")
            with contextlib.suppress(Exception):  # a trace is a convenience; the table is the record
                self.prof.export_chrome_trace(str(self.out_dir / "trace.json.tmp"))
                (self.out_dir / "trace.json.tmp").replace(self.out_dir / "trace.json")
        self.prof = None
        return lines


def summarize(prof, device: torch.device, steps: int, top: int = 12) -> list[str]:
    """Time per step by category and the `top` slowest kernels (GPU) or operators (CPU)."""
    on_gpu = device.type == "cuda"
    rows = []
    for event in prof.key_averages():
        if on_gpu:
            t = getattr(event, "self_device_time_total", None)
            if t is None:
                t = getattr(event, "self_cuda_time_total", 0)
            # kernels only: CPU-side operators also carry the device time of the kernels they launch
            if getattr(event, "device_type", None) is not None and str(event.device_type).endswith("CPU"):
                continue
        else:
            t = event.self_cpu_time_total
            # operators, and compiled graphs, whose self time is inductor's generated C++ kernels (on CPU
            # the profiler does not see those one by one); Python and autograd frames are left out
            if not event.key.startswith(("aten::", "raylm_cpu::", "## Call CompiledFxGraph")):
                continue
        if t > 0:
            rows.append((event.key, t, event.count))
    total = sum(t for _, t, _ in rows) or 1
    by_cat: dict[str, float] = {}
    for name, t, _ in rows:
        by_cat[category(name)] = by_cat.get(category(name), 0.0) + t
    what = "GPU kernel time" if on_gpu else "CPU operator self time"
    lines = [f"Profile of {steps} step(s): {what} {total / steps / 1e3:,.1f} ms per step"]
    for label, t in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {label:<38s} {t / steps / 1e3:>9,.2f} ms/step  {100 * t / total:5.1f}%")
    lines.append(f"  slowest {'kernels' if on_gpu else 'operators'}:")
    for name, t, count in sorted(rows, key=lambda r: -r[1])[:top]:
        short = name if len(name) <= 70 else name[:67] + "..."
        lines.append(f"    {100 * t / total:5.1f}%  {t / steps / 1e3:8.2f} ms/step  x{count // steps:<4d} {short}")
    return lines
