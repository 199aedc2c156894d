"""JIT build of the splitvl C++/CUDA extension.

`load_extension()` compiles every `ops/csrc/*.cpp`, `ops/csrc/cpu/*.cpp` and,
when CUDA is usable (or `SPLITVL_BUILD_CUDA=1`), every `ops/csrc/cuda/*.cu` into
one library that registers `torch.ops.splitvl`. The build directory is keyed by
torch version, backend and a hash of the sources and flags, so unchanged
sources load the cached library and concurrent processes share one build
(guarded by a file lock). Compute capability 9.0 in `TORCH_CUDA_ARCH_LIST` (default
9.0 without a GPU, the visible GPUs' otherwise) is built as 9.0a: `hopper_arch_list`.

    python -m ops.build          # build (CUDA too when a GPU is usable) and list the ops
    python -m ops.build --cuda   # also compile the CUDA sources without a GPU
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
EXTENSION_NAME = "splitvl_ops"
DEFAULT_CUDA_HOME = "/usr/local/cuda"
DEFAULT_CUDA_ARCH = "9.0"

# No -std: torch >= 2.10 headers need C++20, which torch.utils.cpp_extension passes.
CXX_FLAGS = ("-O3", "-fopenmp", "-DSPLITVL_OPS")
LD_FLAGS = ("-fopenmp",)
NVCC_FLAGS = (
    "-O3",
    "--use_fast_math",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-lineinfo",
)


class ExtensionBuildError(RuntimeError):
    """The splitvl extension could not be compiled or loaded."""


@dataclass(frozen=True, slots=True)
class BuildPlan:
    """Everything that determines one build (and its cache directory)."""

    sources: tuple[Path, ...]
    cuda: bool
    cxx_flags: tuple[str, ...]
    nvcc_flags: tuple[str, ...]
    include_dirs: tuple[str, ...]
    build_dir: Path


def cuda_requested(cuda: bool | None) -> bool:
    """Compile CUDA sources? Explicit argument, else `SPLITVL_BUILD_CUDA`, else a usable GPU."""
    if cuda is not None:
        return cuda
    env = os.environ.get("SPLITVL_BUILD_CUDA")
    if env is not None and env != "":
        return env not in ("0", "false", "False")
    return torch.cuda.is_available() and torch.version.cuda is not None


def collect_sources(cuda: bool) -> tuple[Path, ...]:
    """All C++ sources, plus the CUDA ones when building CUDA, in a stable order."""
    sources = sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))
    if cuda:
        sources += sorted((CSRC / "cuda").glob("*.cu"))
    return tuple(sources)


def _headers() -> list[Path]:
    patterns = ("*.h", "*.cuh", "*.hpp")
    return sorted(p for d in (CSRC, CSRC / "cpu", CSRC / "cuda") for pat in patterns for p in d.glob(pat))


def nvidia_include_dirs() -> tuple[str, ...]:
    """`<site-packages>/nvidia/cu13/include` (cusparse.h etc. for GPU-less builds), if present."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return ()
    dirs = []
    for root in nvidia.__path__:
        for sub in ("cu13", "cu12"):
            inc = Path(root) / sub / "include"
            if inc.is_dir():
                dirs.append(str(inc))
    return tuple(dirs)


def _source_hash(sources: tuple[Path, ...], flags: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for path in list(sources) + _headers():
        digest.update(str(path.relative_to(CSRC)).encode())
        digest.update(path.read_bytes())
    digest.update("\0".join(flags).encode())
    return digest.hexdigest()[:16]


def plan_build(cuda: bool | None = None) -> BuildPlan:
    """Resolve sources, flags and the cache directory for this process's build."""
    use_cuda = cuda_requested(cuda)
    sources = collect_sources(use_cuda)
    include_dirs = (str(CSRC),) + (nvidia_include_dirs() if use_cuda else ())
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if use_cuda else ""
    compilers = (os.environ.get("CXX", ""), os.environ.get("CUDA_HOME", "") if use_cuda else "")
    flags = CXX_FLAGS + include_dirs + compilers + ((arch,) + NVCC_FLAGS if use_cuda else ())
    root = Path(os.environ.get("SPLITVL_OPS_BUILD_DIR") or Path.home() / ".cache" / "splitvl" / "ops")
    tag = f"{torch.__version__}-{'cuda' if use_cuda else 'cpu'}-{_source_hash(sources, flags)}"
    return BuildPlan(
        sources=sources,
        cuda=use_cuda,
        cxx_flags=CXX_FLAGS,
        nvcc_flags=NVCC_FLAGS,
        include_dirs=include_dirs,
        build_dir=root / tag.replace("+", "_"),
    )


def hopper_arch_list(arch_list: str) -> str:
    """`TORCH_CUDA_ARCH_LIST` with compute capability 9.0 built as `9.0a` (`9.0+PTX` as `9.0a+PTX`).

    The wgmma attention kernel (ops/csrc/cuda/varlen_attention_sm90.cu) needs the
    architecture-specific sm_90a target; every other kernel compiles the same for it. The cost:
    sm_90a code runs on compute capability 9.0 only, so `9.0+PTX` no longer carries PTX that a
    newer GPU could JIT (list that GPU's own arch instead). Other entries are kept as they are.
    """
    entries = [e for e in arch_list.replace(" ", ";").split(";") if e]
    return ";".join("9.0a" + e[3:] if e in ("9.0", "9.0+PTX") else e for e in entries)


def device_arch_list() -> str:
    """The visible GPUs' compute capabilities, the newest with +PTX (torch's default list)."""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps) + "+PTX" if caps else DEFAULT_CUDA_ARCH


def _prepare_cuda_env() -> None:
    """CUDA builds: point at the local toolkit, default to sm_90 without a GPU, and build 9.0 as 9.0a."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and Path(DEFAULT_CUDA_HOME).is_dir():
        # torch would otherwise derive it from `which nvcc`, a wrapper in /usr/local/bin here.
        home = os.environ["CUDA_HOME"] = DEFAULT_CUDA_HOME
    import torch.utils.cpp_extension as cpp_ext

    if home:
        cpp_ext.CUDA_HOME = home
    if cpp_ext.CUDA_HOME is None or not (Path(cpp_ext.CUDA_HOME) / "bin" / "nvcc").exists():
        raise ExtensionBuildError(f"CUDA build requested but no CUDA toolkit at {cpp_ext.CUDA_HOME} (set CUDA_HOME)")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if not arch_list or arch_list == "native":
        arch_list = device_arch_list() if torch.cuda.is_available() else DEFAULT_CUDA_ARCH
    os.environ["TORCH_CUDA_ARCH_LIST"] = hopper_arch_list(arch_list)


def _compile(plan: BuildPlan, verbose: bool) -> None:
    plan.build_dir.mkdir(parents=True, exist_ok=True)
    lock_path = plan.build_dir.with_name(plan.build_dir.name + ".lock")
    library = plan.build_dir / f"{EXTENSION_NAME}.so"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():
            # The directory is keyed by a hash of every source and flag, so an
            # existing library is this build: load it without asking ninja.
            try:
                torch.ops.load_library(str(library))
                return
            except OSError:  # e.g. truncated by a killed link step: rebuild it
                library.unlink()
        import torch.utils.cpp_extension as cpp_ext

        # We hold the exclusive lock, so a leftover torch baton is from a killed build.
        (plan.build_dir / "lock").unlink(missing_ok=True)
        cpp_ext.load(
            name=EXTENSION_NAME,
            sources=[str(s) for s in plan.sources],
            extra_cflags=list(plan.cxx_flags),
            extra_cuda_cflags=list(plan.nvcc_flags) if plan.cuda else None,
            extra_ldflags=list(LD_FLAGS),
            extra_include_paths=list(plan.include_dirs),
            build_directory=str(plan.build_dir),
            with_cuda=plan.cuda,
            is_python_module=False,
            verbose=verbose,
        )


class _LoadedLibrary:
    """The one build dlopen'ed into this process (a library cannot be unloaded)."""

    lock = threading.Lock()
    plan: BuildPlan | None = None
    errors: dict[bool, ExtensionBuildError] = {}  # failed builds are not retried


def load_extension(cuda: bool | None = None, verbose: bool = False) -> BuildPlan:
    """Build (or load the cached build of) the extension once per process.

    Args:
        cuda: compile the CUDA sources; None decides from `SPLITVL_BUILD_CUDA`
            or whether a GPU is usable.
        verbose: show compiler command lines.
    Returns:
        The plan that was built; the ops are then on `torch.ops.splitvl`.
    Raises:
        ExtensionBuildError naming the cause (compiler output is in the message).
    """
    want_cuda = cuda_requested(cuda)
    with _LoadedLibrary.lock:
        loaded = _LoadedLibrary.plan
        if loaded is not None:
            if want_cuda and not loaded.cuda:
                raise ExtensionBuildError("a CPU-only build is already loaded in this process")
            return loaded
        if want_cuda in _LoadedLibrary.errors:
            raise _LoadedLibrary.errors[want_cuda]
        if want_cuda:
            _prepare_cuda_env()
        plan = plan_build(want_cuda)
        try:
            _compile(plan, verbose)
        except Exception as exc:  # compiler / loader errors come in many types
            error = ExtensionBuildError(f"building {plan.build_dir.name} failed: {exc}")
            _LoadedLibrary.errors[want_cuda] = error
            raise error from exc
        _LoadedLibrary.plan = plan
        return plan


def registered_ops() -> dict[str, list[str]]:
    """`{op name: [backends with a kernel]}` for every op on torch.ops.splitvl."""
    result: dict[str, list[str]] = {}
    for schema in torch._C._jit_get_all_schemas():
        if not schema.name.startswith("splitvl::"):
            continue
        name = schema.name
        keys = ("CPU", "CUDA", "Meta")
        result[name.split("::", 1)[1]] = [
            k for k in keys if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)
        ]
    return dict(sorted(result.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.build", description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="compile the CUDA sources even without a GPU")
    parser.add_argument("--verbose", action="store_true", help="show compiler command lines")
    args = parser.parse_args(argv)
    loaded = _LoadedLibrary.plan
    if args.cuda and loaded is not None and not loaded.cuda:
        # `import ops` already loaded the CPU-only build, and one process can hold
        # only one splitvl library: rebuild in a fresh process that skips it.
        env = dict(os.environ, SPLITVL_REFERENCE_OPS="1", SPLITVL_BUILD_CUDA="1")
        cmd = [sys.executable, "-m", "ops.build", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd, env=env, cwd=CSRC.parents[1], check=False).returncode
    try:
        plan = load_extension(True if args.cuda else None, verbose=args.verbose)
    except ExtensionBuildError as exc:
        print(f"ops.build: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"built {EXTENSION_NAME} ({'cpu+cuda' if plan.cuda else 'cpu'}) in {plan.build_dir}")
    for source in plan.sources:
        print(f"  source {source.relative_to(CSRC.parent)}")
    for name, backends in registered_ops().items():
        print(f"  splitvl::{name:<28} {', '.join(backends) or '(no kernels)'}")
    return 0


if __name__ == "__main__":
    # Run the copy `import ops` already loaded, so the loaded-library state is shared.
    from ops.build import main as _main

    sys.exit(_main())
