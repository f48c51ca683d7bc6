"""Shared test setup.

Without a CUDA device the Triton kernels run in Triton's CPU interpreter; ``TRITON_INTERPRET``
must be set before triton is first imported, i.e. here, before any test module is collected.
"""

import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory first on sys.path; from the repository root, its
# top-level kernels/ (shipped as layerswap_fast.kernels) would then shadow the `kernels` package
# that transformers imports. The package is installed: the tests never need the root on the path.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # torch is an optional (GPU/test) dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Input checksums are cached under $XDG_CACHE_HOME: keep the tests' cache to themselves."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, _ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


#: builds and finds the real-model trios (scripts/real_models.py); imports nothing heavy itself
real_models = _load_script("real_models")


def real_trio(family: str) -> dict[str, Path]:
    """The family's base, task and language experts and held-out texts, built once per machine
    (in a child process: the build trains with torch and must not share this one's warnings filter
    or memory)."""
    import subprocess

    if real_models.manifest(family) is None:
        done = subprocess.run([sys.executable, str(_ROOT / "scripts" / "real_models.py"), "--family", family],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"building the {family} test models failed:\n{done.stderr[-4000:]}", pytrace=False)
    return real_models.ensure(family)
