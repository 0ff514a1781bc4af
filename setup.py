"""Build script: the Python package, the Triton kernels and the optional C++/CUDA extension.

Build knobs (environment variables, read at build time):

The extension is compiled here only when the build can import torch, that is without pip's build
isolation (``./run``, ``pip install --no-build-isolation``): an isolated build would compile against
a torch other than the one that imports the package. A plain ``pip install`` gives a pure-Python
install that compiles the extension on first use against the running torch
(``elogitnorm_fast/extension.py``; ``docs/install.md``).

* ``ELOGITNORM_FAST_BUILD_CUDA``: ``auto`` (default: build CUDA sources when torch has CUDA,
  ``nvcc`` is found, and a GPU is visible or ``TORCH_CUDA_ARCH_LIST`` is set), ``1``/``force``
  (always; fails if impossible), ``0``/``never``.
* ``TORCH_CUDA_ARCH_LIST``: the CUDA architectures, e.g. ``"8.0;9.0"`` (torch's own knob; unset,
  torch builds for the GPUs it sees).
* ``ELOGITNORM_FAST_CPU_ARCH``: ``native`` (default: ``-march=native``, vectorises the CPU loss
  loops for the build machine's SIMD width), ``portable`` (the compiler's baseline, for wheels
  that move between machines), or any other value passed as ``-march=VALUE``.
* ``ELOGITNORM_FAST_NO_EXTENSION=1``: skip the C++ extension; the pure-PyTorch backends remain.
* ``MAX_JOBS``: parallel compile jobs (torch's own knob).
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_mode() -> str:
    raw = os.environ.get("ELOGITNORM_FAST_BUILD_CUDA", "auto").strip().lower()
    if raw in ("1", "force", "yes", "true", "on"):
        return "force"
    if raw in ("0", "never", "no", "false", "off"):
        return "never"
    if raw != "auto":
        raise ValueError(f"ELOGITNORM_FAST_BUILD_CUDA must be auto, force or never, got {raw!r}")
    return "auto"


def _cpu_arch_flags() -> list[str]:
    raw = os.environ.get("ELOGITNORM_FAST_CPU_ARCH", "native").strip()
    if raw in ("", "portable", "none"):
        return []
    return [f"-march={raw}"]


def _extensions() -> tuple[list, dict]:
    if os.environ.get("ELOGITNORM_FAST_NO_EXTENSION", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # torch missing at build time: pure-Python install
        return [], {}

    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    if not cpp_sources:
        return [], {}
    mode = _cuda_mode()
    has_nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    # With no GPU visible and no architecture list, torch cannot tell nvcc what to target.
    targets_known = torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    with_cuda = bool(cuda_sources) and (
        mode == "force"
        or (mode == "auto" and torch.version.cuda is not None and has_nvcc and targets_known)
    )
    if mode == "force" and torch.version.cuda is None:
        raise RuntimeError(
            "ELOGITNORM_FAST_BUILD_CUDA=force but this torch has no CUDA "
            f"(torch {torch.__version__}); install a CUDA build of torch"
        )
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", *_cpu_arch_flags()]
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    extra = {"cxx": cxx_flags}
    if with_cuda:
        # No --use_fast_math: the kernels pick their fast intrinsics explicitly (parity matters).
        extra["nvcc"] = ["-O3", "-std=c++17"]
        define_macros.append(("ELOGITNORM_FAST_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
        sources = cpp_sources + cuda_sources
    else:
        ext_cls = cpp_extension.CppExtension
        sources = cpp_sources
    ext = ext_cls(
        name="elogitnorm_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
        py_limited_api=True,
    )
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildWithTorchVersion(base):
        """Writes, beside the library, the torch version it was compiled against: the loader
        refuses a library built for another torch instead of letting it crash the process."""

        def run(self) -> None:
            super().run()
            for extension in self.extensions:
                library = self.get_ext_fullpath(extension.name)
                version_file = os.path.join(os.path.dirname(library), "_C.torch_version")
                with open(version_file, "w", encoding="utf-8") as handle:
                    handle.write(torch.__version__ + "\n")

    return [ext], {"build_ext": BuildWithTorchVersion}


ext_modules, cmdclass = _extensions()

setup(
    name="elogitnorm_fast",
    version="0.1.0",
    description="Fast LogitNorm / ELogitNorm losses, OOD scorers and metrics for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["elogitnorm_fast", "elogitnorm_fast.*"])
    + ["elogitnorm_fast.kernels", "elogitnorm_fast.csrc"],
    # The C++ / CUDA sources travel inside the package, for compiling on first use.
    package_dir={"elogitnorm_fast.kernels": "kernels", "elogitnorm_fast.csrc": "csrc"},
    package_data={
        "elogitnorm_fast": ["_C.torch_version"],
        "elogitnorm_fast.csrc": [
            f"**/*{suffix}" for suffix in (".cpp", ".h", ".inc", ".cu", ".cuh")
        ],
    },
    install_requires=["torch>=2.4", "numpy", "ninja"],
    extras_require={
        "triton": ["triton"],
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scikit-learn", "ruff"],
        "bench": ["pytest-benchmark", "scikit-learn", "matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["elogitnorm-fast=elogitnorm_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
    zip_safe=False,
)
