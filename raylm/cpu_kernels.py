"""raylm's fused fp32 CPU kernels (raylm/csrc/fused_cpu.cpp), compiled on first use.

On a CPU the elementwise parts of a Llama block (SwiGLU, RMSNorm, the rotary embedding) cost what their
passes over memory cost: each separate PyTorch op reads and writes whole activations. The C++ kernels do
each part, forward or backward, in one pass, vectorised with PyTorch's own vector type and run on its
threads. raylm/model.py uses them in eager fp32 CPU training (`hand_written_backward`); compiled models
fuse the same ops with inductor, and GPUs and 16-bit runs keep the plain ops.

The kernels are built with torch.utils.cpp_extension the first time a process needs them: about 10 s on
2 cores, once per machine, PyTorch and raylm version, cached under ~/.cache/torch_extensions (or
$TORCH_EXTENSIONS_DIR). They need a C++ compiler (g++ or clang) and ninja (a raylm dependency), and are
built for x86 CPUs with AVX2 or AVX-512 (as PyTorch runs them). Elsewhere, and with
RAYLM_FUSED_CPU_KERNELS=0, the same maths runs as separate PyTorch ops, a few per cent slower; a build
that fails says why once per process (and later processes do not retry it).
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "fused_cpu.cpp"
ENV_SWITCH = "RAYLM_FUSED_CPU_KERNELS"  # "0" turns them off

_lock = threading.Lock()
_ops = None  # torch.ops.raylm_cpu once loaded
_failure: str | None = None  # why they could not be loaded, once tried


def _compile_flags() -> list[str] | None:
    """Vector width as PyTorch itself runs on this CPU (torch.backends.cpu.get_cpu_capability): AVX-512
    or AVX2. None elsewhere (ARM, older x86): there PyTorch's portable vector type would be plain loops,
    no match for PyTorch's own vectorised kernels, so the plain ops run."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        isa = ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
    elif capability == "AVX2":
        isa = ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"]
    else:
        return None
    # -fopenmp: at::parallel_for's OpenMP pragmas (at run time the extension shares torch's own libgomp)
    return ["-O3", "-fopenmp", *isa]


def _build_name(flags: list[str]) -> str:
    """A name per source, flags and PyTorch version, so that builds for different ones never collide."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + torch.__version__.encode()
                            + sys.version.encode())
    return f"raylm_fused_cpu_{digest.hexdigest()[:12]}"


def _load():
    """Build (or find the build of) the extension and load it; raises what the build raised. A failed
    build leaves FAILED in its folder, so later processes skip the attempt (and its seconds) and warn."""
    from torch.utils import cpp_extension

    flags = _compile_flags()
    if flags is None:
        raise _NotForThisCPU(f"PyTorch runs this CPU with {torch.backends.cpu.get_cpu_capability()} vectors; "
                             "the fused kernels are built for AVX2 and AVX-512")
    # ninja comes with raylm's dependencies, in the environment's bin folder, which need not be on PATH
    # (a virtual environment used without activating it; a Ray worker)
    bin_dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        bin_dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "")
    missing = [d for d in bin_dirs if d not in path.split(os.pathsep)]
    if missing:
        os.environ["PATH"] = os.pathsep.join([*missing, *([path] if path else [])])
    name = _build_name(flags)
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    build_dir = Path(root) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    failed = build_dir / "FAILED"
    if failed.exists():
        raise RuntimeError(f"an earlier build failed: {failed.read_text().strip()} (delete {build_dir} to try again)")
    fresh = not any(build_dir.glob(f"{name}*.so"))
    started = time.perf_counter()
    if fresh:
        print(f"raylm: compiling the fused CPU kernels (once per machine and PyTorch version; ~10-60 s) "
              f"in {build_dir}", flush=True)  # stdout: Ray Train's workers print their stderr twice
    try:
        cpp_extension.load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                           build_directory=str(build_dir), is_python_module=False, verbose=False)
    except Exception as error:
        reason = _last_line(error)
        try:
            _atomic_write(failed, reason + "\n")
        except OSError:
            pass
        raise RuntimeError(f"{reason} (delete {build_dir} to try again)") from error
    if fresh:
        print(f"raylm: fused CPU kernels compiled in {time.perf_counter() - started:.0f} s", flush=True)
    return torch.ops.raylm_cpu


class _NotForThisCPU(Exception):
    """The kernels are not built for this CPU: the plain ops run, without a warning."""


def _last_line(error: BaseException) -> str:
    """The line of a build's output that says what went wrong (the compiler's first error, or a missing
    program), rather than ninja's closing "build stopped"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Error building extension", "ninja: build stopped"))]
    for pattern in (r"\berror:", r"not found|No such file|command not found", r"\berror\b"):  # most telling first
        telling = [line for line in lines if re.search(pattern, line, re.IGNORECASE)]
        if telling:
            return f"{type(error).__name__}: {telling[0][:300]}"
    line = lines[-1] if lines else str(error).strip()
    return f"{type(error).__name__}: {line[:300]}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fused_cpu_ops():
    """torch.ops.raylm_cpu (swiglu_forward/backward, rms_norm_forward/backward, rotary_qk_forward,
    rotary_qkv_backward), compiled and loaded on the first call; None where they cannot be (the reason
    is warned once per process), on CPUs they are not built for, or with RAYLM_FUSED_CPU_KERNELS=0."""
    global _ops, _failure
    if _ops is not None:
        return _ops
    if _failure is not None or os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    with _lock:
        if _ops is None and _failure is None:
            try:
                _ops = _load()
            except _NotForThisCPU as reason:
                _failure = str(reason)
            except Exception as error:  # no compiler, no ninja, a compiler that rejects the flags, ...
                _failure = str(error) if isinstance(error, RuntimeError) else _last_line(error)
                warnings.warn(
                    f"raylm: the fused CPU kernels are unavailable ({_failure}). Training on CPU runs the same "
                    f"maths as separate PyTorch ops instead, a few per cent slower. A C++ compiler (g++ or "
                    f"clang) and ninja give them; {ENV_SWITCH}=0 skips the attempt.",
                    RuntimeWarning, stacklevel=2)
    return _ops


def fused_cpu_kernels_status() -> str:
    """'on', 'off (RAYLM_FUSED_CPU_KERNELS=0)' or 'unavailable: <why>', after trying to load them."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"off ({ENV_SWITCH}=0)"
    return "on" if fused_cpu_ops() is not None else f"unavailable: {_failure}"


def describe_cpu_kernels() -> str:
    """What runs RMSNorm, SwiGLU and the rotary embedding of an fp32 eager CPU run, for the banner."""
    status = fused_cpu_kernels_status()
    if status == "on":
        return "fused (raylm/csrc/fused_cpu.cpp)"
    if status.startswith("off"):
        return f"separate PyTorch ops ({ENV_SWITCH}=0)"
    return f"separate PyTorch ops (the fused kernels are {status})"
