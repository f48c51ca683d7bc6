"""``python -m layerswap_fast.cli``: the same exit path as the console script."""

from . import run

run()
