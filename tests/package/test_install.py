"""Installing the package the way users do, and the loader's refusal of a mismatched build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

from elogitnorm_fast.extension import VERSION_FILE, prebuilt_mismatch

ROOT = Path(__file__).resolve().parents[2]
SKIP = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache",
        ".benchmarks", "out", "demo_output"}


def _copy_checkout(target: Path) -> None:
    """The checkout as a clone would hold it: sources only, no build products or venvs."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {name for name in names if name in SKIP or name.endswith((".so", ".egg-info"))
                or name == VERSION_FILE}

    shutil.copytree(ROOT, target, ignore=ignore)


@pytest.mark.slow
def test_plain_pip_install_into_a_fresh_venv_compiles_for_its_torch(tmp_path):
    """``pip install PATH`` with pip's defaults (build isolation) into a venv holding only the
    CPU torch: the install succeeds, the cpu backend compiles on first use against that torch and
    matches the reference, a later import prints nothing (triton is absent there), and ``bench``
    refuses in one line, the benchmarks being no part of the install."""
    source, env_dir, cache = tmp_path / "src", tmp_path / "venv", tmp_path / "cache"
    _copy_checkout(source)
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("ELOGITNORM_FAST", "TRITON", "PYTHON", "VIRTUAL_ENV"))}
    env = dict(base_env, ELOGITNORM_FAST_CACHE=str(cache))

    def pip(*args: str) -> None:
        done = subprocess.run([python, "-m", "pip", "install", "--quiet", *args], env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]

    pip(f"torch=={torch.__version__.split('+')[0]}")
    pip(str(source))
    first = (
        "import torch, elogitnorm_fast as ef\n"
        "from elogitnorm_fast.reference import elogitnorm_reference\n"
        "assert 'cpu' in ef.available_backends('cpu'), ef.unavailable_reason('cpu')\n"
        "z = torch.randn(9, 5, dtype=torch.float64); w = torch.randn(5, 3, dtype=torch.float64)\n"
        "y = torch.randint(0, 5, (9,))\n"
        "torch.testing.assert_close(ef.elogitnorm_loss(z, w, y, backend='cpu'),\n"
        "                           elogitnorm_reference(z, w, y))\n"
        "print('ok')\n"
    )
    done = subprocess.run([python, "-c", first], env=env, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip() == "ok"
    assert "compiling the C++ extension" in done.stderr
    again = subprocess.run([python, "-c", "import elogitnorm_fast"], env=env,
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (again.stdout, again.stderr) == ("", "")
    # The benchmarks stay in the checkout: an installed package's bench says so in one line.
    bench = subprocess.run([python, "-m", "elogitnorm_fast", "bench", "--quick"], env=env,
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bench.returncode == 2, bench.stderr[-4000:]
    assert bench.stderr.startswith("error: bench runs from a source checkout")
    assert bench.stderr.count("\n") == 1


def test_a_library_built_for_another_torch_is_refused_naming_both_versions(tmp_path):
    library = tmp_path / "_C.abi3.so"
    library.write_bytes(b"")
    (tmp_path / VERSION_FILE).write_text("2.0.0+cu118\n", encoding="utf-8")
    reason = prebuilt_mismatch(library, "2.13.0+cpu")
    assert reason is not None and "2.0.0+cu118" in reason and "2.13.0+cpu" in reason
    (tmp_path / VERSION_FILE).write_text("2.13.0+cpu\n", encoding="utf-8")
    assert prebuilt_mismatch(library, "2.13.0+cpu") is None
    (tmp_path / VERSION_FILE).unlink()
    assert "2.13.0+cpu" in prebuilt_mismatch(library, "2.13.0+cpu")


def test_this_checkout_built_its_library_for_the_running_torch():
    """``./run`` builds without isolation, so the library here is for this torch and loads."""
    from elogitnorm_fast.extension import load_error

    spec_dir = ROOT / "elogitnorm_fast"
    if not any(spec_dir.glob("_C*.so")):
        pytest.skip("no prebuilt extension in this checkout")
    assert (spec_dir / VERSION_FILE).read_text(encoding="utf-8").strip() == torch.__version__
    assert load_error() is None
    assert sys.modules.get("elogitnorm_fast._C") is not None
