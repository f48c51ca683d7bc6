"""Shared test setup.

Without a CUDA device the Triton kernels run in Triton's CPU interpreter; ``TRITON_INTERPRET``
must be set before triton is first imported, i.e. here, before any test module is collected.
"""

import os

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
