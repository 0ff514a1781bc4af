"""Loading the compiled extension (C++ / CUDA ops), once per process, for every user.

Loading the library registers its ops under ``torch.ops.elogitnorm_fast``; the loss backends, the
logit-scores op and the KNN selection each ask :func:`has_ops` for the ops they need.

Two ways to get it, tried in order (``docs/install.md`` explains the choice):

1. **Built with the package** (``./run``, or ``pip install --no-build-isolation``): the library
   ``elogitnorm_fast._C`` with a file beside it naming the torch it was compiled against. It is
   loaded only when that torch is the one running: a library built for another torch can crash
   the process instead of failing to import.
2. **Compiled on first use** against the running torch, from the sources shipped in the package,
   into a cache folder (``ELOGITNORM_FAST_CACHE``, default ``~/.cache/elogitnorm_fast``), one
   folder per torch version and source hash. This is what a plain ``pip install`` gives: pip
   builds in an isolated environment with its own torch, so the package leaves compiling to the
   torch that will import it. Set ``ELOGITNORM_FAST_JIT=0`` to never compile (the pure-PyTorch
   backends serve).

Whenever neither works, :func:`load_error` says why and the pure-PyTorch backends serve.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

#: Written beside ``_C`` at build time: the ``torch.__version__`` it was compiled against.
VERSION_FILE = "_C.torch_version"
_SOURCE_SUFFIXES = (".cpp", ".h", ".inc", ".cu", ".cuh")


def prebuilt_mismatch(library: Path, running: str) -> str | None:
    """Why the prebuilt ``library`` must not be loaded under torch ``running`` (None: it may)."""
    version_file = library.parent / VERSION_FILE
    if not version_file.exists():
        return (f"{library.name} has no {VERSION_FILE} beside it, so the torch it was built "
                f"against is unknown; rebuild it against torch {running}")
    built = version_file.read_text(encoding="utf-8").strip()
    if built != running:
        return (f"{library.name} was built against torch {built} but torch {running} is "
                f"running; rebuild it (pip install --force-reinstall --no-build-isolation)")
    return None


def _prebuilt_error() -> str | None:
    try:
        spec = importlib.util.find_spec("elogitnorm_fast._C")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        return "the compiled extension elogitnorm_fast._C is not built"
    mismatch = prebuilt_mismatch(Path(spec.origin), torch.__version__)
    if mismatch is not None:
        return mismatch
    try:
        from . import _C  # noqa: F401  (loading the library registers the ops)
    except (ImportError, OSError) as error:
        return f"the compiled extension elogitnorm_fast._C could not be loaded ({error})"
    return None


def source_dir() -> Path | None:
    """The C++ / CUDA sources: inside the installed package, or beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "ops.cpp").exists():
            return candidate
    return None


def _sources(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.suffix in suffixes)


def _want_cuda() -> bool:
    # Without a visible GPU or an explicit architecture list, nvcc would not know what to target.
    return (torch.version.cuda is not None and shutil.which("nvcc") is not None
            and (torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))))


def cache_folder(root: Path, with_cuda: bool) -> Path:
    """Where the compiled library for this torch and these sources lives."""
    digest = hashlib.sha256()
    for path in _sources(root, _SOURCE_SUFFIXES):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    base = Path(os.environ.get("ELOGITNORM_FAST_CACHE")
                or Path.home() / ".cache" / "elogitnorm_fast")
    flavour = "cuda" if with_cuda else "cpu"
    return base / f"torch-{torch.__version__}-{flavour}-{digest.hexdigest()[:16]}"


#: A build lock older than this was left by a killed build (torch's lock would wait forever).
_STALE_LOCK_SECONDS = 30 * 60


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """The ``ninja`` pip package's binary on PATH while compiling: a venv's ``bin`` is not on PATH
    when its python is called directly, and torch looks for ninja there."""
    folder = os.path.dirname(sys.executable)
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = folder + os.pathsep + old if old else folder
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _compile_error() -> str | None:
    if os.environ.get("ELOGITNORM_FAST_JIT", "1") == "0":
        return "compiling on first use is off (ELOGITNORM_FAST_JIT=0)"
    root = source_dir()
    if root is None:
        return "the package ships no C++ sources to compile"
    from torch.utils import cpp_extension

    with_cuda = _want_cuda()
    folder = cache_folder(root, with_cuda)
    library, lock = folder / "elogitnorm_fast_C.so", folder / "lock"
    if library.exists() and not lock.exists():  # built, and no build is writing it now
        torch.ops.load_library(str(library))
        return None
    folder.mkdir(parents=True, exist_ok=True)
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
        lock.unlink(missing_ok=True)
    suffixes = (".cpp", ".cu") if with_cuda else (".cpp",)
    cflags = ["-O3", "-std=c++17", "-fopenmp", "-march=native"]
    try:
        with _ninja_on_path():
            if not cpp_extension.is_ninja_available():
                return "ninja is not installed (pip install ninja), so it cannot be compiled"
            print(f"elogitnorm_fast: compiling the C++ extension for torch {torch.__version__} "
                  f"into {folder} (once; a minute or two)", file=sys.stderr, flush=True)
            cpp_extension.load(
                name="elogitnorm_fast_C",
                sources=[str(path) for path in _sources(root, suffixes)],
                extra_cflags=cflags + (["-DELOGITNORM_FAST_WITH_CUDA=1"] if with_cuda else []),
                extra_cuda_cflags=["-O3", "-std=c++17", "-DELOGITNORM_FAST_WITH_CUDA=1"],
                extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(root)],
                build_directory=str(folder),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=False,
            )
    except Exception as error:  # compiler missing or failing: the pure-PyTorch backends serve
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        return f"compiling the extension into {folder} failed ({first_line})"
    return None


@functools.lru_cache(maxsize=1)
def load_error() -> str | None:
    """Why the compiled ops are not loaded (None: they are loaded and registered). Tried once per
    process: the prebuilt library first, then one compiled for the running torch."""
    prebuilt = _prebuilt_error()
    if prebuilt is None:
        return None
    compiled = _compile_error()
    if compiled is None:
        return None
    return f"{prebuilt}; {compiled}"


def has_ops(*names: str) -> bool:
    """Whether the extension loaded and registered every op in ``names``."""
    if load_error() is not None:
        return False
    namespace = torch.ops.elogitnorm_fast
    return all(hasattr(namespace, name) for name in names)


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` asks for the Triton interpreter (kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
