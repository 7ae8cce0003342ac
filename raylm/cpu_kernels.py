"""raylm's fused fp32 CPU kernels (raylm/csrc/fused_cpu.cpp), compiled on first use.

On a CPU the elementwise parts of a Llama block (SwiGLU, RMSNorm, the rotary embedding) cost what their
passes over memory cost: each separate PyTorch op reads and writes whole activations. The C++ kernels do
each part, forward or backward, in one pass, vectorised with PyTorch's own vector type and run on its
threads. raylm/model.py uses them in eager CPU training in fp32 (`hand_written_backward`) and under bf16
autocast (`fused_under_autocast`: bf16 storage, fp32 arithmetic); compiled models fuse the same ops with
inductor, and GPUs and fp16 keep the plain ops.

The kernels are built with torch.utils.cpp_extension the first time a process needs them: about 10 s on
2 cores, then kept in the user's ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR), one build per kernel
source, PyTorch, Python and environment. They need a C++ compiler with OpenMP (g++) and ninja (a raylm
dependency), and are built for x86 CPUs with AVX2 or AVX-512 (as PyTorch runs them); they run on PyTorch's
own OpenMP threads. Elsewhere, and with RAYLM_FUSED_CPU_KERNELS=0, the same maths runs as separate PyTorch
ops, 4-10% slower in fp32 and about a fifth in bf16 (jobs/bench_cpu_kernels.py); a build that fails says
why once per process (and later processes do not retry it).
"""
from __future__ import annotations

import contextlib
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
    # -fopenmp: at::parallel_for's OpenMP pragmas (_openmp_link_flags links the runtime PyTorch already uses)
    return ["-O3", "-fopenmp", *isa]


def _build_name(flags: list[str]) -> str:
    """A name per kernel source, flags, PyTorch, Python and environment (sys.prefix), so that builds for
    different ones never collide or rebuild each other."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + torch.__version__.encode()
                            + sys.version.encode() + sys.prefix.encode())
    return f"raylm_fused_cpu_{digest.hexdigest()[:12]}"


def _build_dir(flags: list[str]) -> Path:
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / _build_name(flags)


def _openmp_link_flags() -> list[str]:
    """Link the kernels against the OpenMP runtime this process's PyTorch already loaded (its own libgomp,
    whatever its file is called), so that at::parallel_for in the kernels runs on PyTorch's threads rather
    than on a second runtime's pool. -fopenmp (the compiler's runtime) where it cannot be found."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if line.split()[-1].startswith("/")}
    except OSError:
        return ["-fopenmp"]
    for path in sorted(paths):
        base = os.path.basename(path)
        if base.startswith(("libgomp", "libiomp5", "libomp")) and os.path.exists(path):
            return [path, f"-Wl,-rpath,{os.path.dirname(path)}"]
    return ["-fopenmp"]


def _check_private(folder: Path) -> None:
    """Refuse a build folder that other users can write to: they could plant the library it loads."""
    for part in (folder, folder.parent):
        info = part.stat()
        if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
            raise RuntimeError(f"{part} is not owned by this user or is writable by others; point "
                               f"TORCH_EXTENSIONS_DIR at a folder of your own")


@contextlib.contextmanager
def _exclusive(folder: Path):
    """One process at a time builds or loads in `folder` (others wait); the kernel releases the lock of a
    process that dies, so a killed build never leaves the others waiting."""
    try:
        import fcntl
    except ImportError:  # not on Linux or macOS: cpp_extension's own lock file is all there is
        yield
        return
    with open(folder / ".raylm-build.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _tools_on_path():
    """ninja comes with raylm's dependencies, in the environment's bin folder, which need not be on PATH (a
    virtual environment used without activating it; a Ray worker): on PATH for the build, then as before."""
    bin_dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        bin_dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    before = os.environ.get("PATH")
    current = (before or "").split(os.pathsep) if before else []
    os.environ["PATH"] = os.pathsep.join([*[d for d in bin_dirs if d not in current], *current])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def _load():
    """Build (or find the build of) the extension and load it; raises what the build raised. A failed
    build leaves FAILED in its folder, so later processes skip the attempt (and its seconds) and warn."""
    from torch.utils import cpp_extension

    flags = _compile_flags()
    if flags is None:
        raise _NotForThisCPU(f"PyTorch runs this CPU with {torch.backends.cpu.get_cpu_capability()} vectors; "
                             "the fused kernels are built for AVX2 and AVX-512")
    name, build_dir = _build_name(flags), _build_dir(flags)
    build_dir.mkdir(parents=True, exist_ok=True)
    _check_private(build_dir)
    failed = build_dir / "FAILED"
    with _exclusive(build_dir):
        if failed.exists():  # read under the lock: the reason of the build that failed first
            raise RuntimeError(f"an earlier build failed: {failed.read_text().strip()} "
                               f"(delete {build_dir} to try again)")
        (build_dir / "lock").unlink(missing_ok=True)  # cpp_extension's own, left by a build that was killed
        fresh = not any(build_dir.glob(f"{name}*.so"))
        started = time.perf_counter()
        if fresh:
            print(f"raylm: compiling the fused CPU kernels (once; ~10-60 s) in {build_dir}",
                  flush=True)  # stdout: Ray Train's workers print their stderr twice
        try:
            with _tools_on_path():
                cpp_extension.load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=_openmp_link_flags(),
                                   build_directory=str(build_dir), is_python_module=False, verbose=False)
        except Exception as error:
            from raylm.storage import atomic_write_text  # only on failure: pyarrow stays out of model imports

            reason = _telling_line(error)
            with contextlib.suppress(OSError):
                atomic_write_text(failed, reason + "\n")
            raise RuntimeError(f"{reason} (delete {build_dir} to try again)") from error
    if fresh:
        print(f"raylm: fused CPU kernels compiled in {time.perf_counter() - started:.0f} s", flush=True)
    return torch.ops.raylm_cpu


class _NotForThisCPU(Exception):
    """The kernels are not built for this CPU: the plain ops run, without a warning."""


def _telling_line(error: BaseException) -> str:
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


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "1") == "0"


def fused_cpu_ops():
    """torch.ops.raylm_cpu (swiglu_forward/backward, rms_norm_forward/backward, rotary_qk_forward,
    rotary_qkv_backward), compiled and loaded on the first call; None where they cannot be (the reason
    is warned once per process), on CPUs they are not built for, or while RAYLM_FUSED_CPU_KERNELS=0."""
    global _ops, _failure
    if _switched_off():  # read at every call: it also turns loaded kernels off
        return None
    if _ops is not None or _failure is not None:
        return _ops
    with _lock:
        if _ops is None and _failure is None:
            try:
                _ops = _load()
            except _NotForThisCPU as reason:
                _failure = str(reason)
            except Exception as error:  # no compiler, no ninja, a compiler that rejects the flags, ...
                _failure = str(error) if isinstance(error, RuntimeError) else _telling_line(error)
                warnings.warn(
                    f"raylm: the fused CPU kernels are unavailable ({_failure}). Training on CPU runs the same "
                    f"maths as separate PyTorch ops instead, slower (4-10% in fp32, about a fifth in "
                    f"bf16). A C++ compiler (g++) and ninja give them; {ENV_SWITCH}=0 skips the attempt.",
                    RuntimeWarning, stacklevel=2)
    return _ops


def fused_cpu_kernels_expected() -> bool:
    """Whether eager CPU training here (fp32 or bf16 autocast) will run the fused kernels, without building
    them (for the memory planner): loaded already, or not switched off, built for this CPU, and not known
    to fail."""
    if _switched_off():
        return False
    if _ops is not None or _failure is not None:
        return _ops is not None
    flags = _compile_flags()
    return flags is not None and not (_build_dir(flags) / "FAILED").exists()


def fused_cpu_kernels_status() -> str:
    """'on', 'off (RAYLM_FUSED_CPU_KERNELS=0)' or 'unavailable: <why>', after trying to load them."""
    if _switched_off():
        return f"off ({ENV_SWITCH}=0)"
    return "on" if fused_cpu_ops() is not None else f"unavailable: {_failure}"


def describe_cpu_kernels() -> str:
    """What runs RMSNorm, SwiGLU and the rotary embedding of an eager CPU run in fp32 or bf16, for the banner."""
    status = fused_cpu_kernels_status()
    if status == "on":
        return "fused (raylm/csrc/fused_cpu.cpp)"
    if status.startswith("off"):
        return f"separate PyTorch ops ({ENV_SWITCH}=0)"
    return f"separate PyTorch ops (the fused kernels are {status})"
