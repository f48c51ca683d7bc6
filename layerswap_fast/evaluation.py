"""Evaluating sweep candidates: a user's function, or the built-in held-out loss of a text file.

``--eval module:function`` names a function called with each candidate: its output directory, or
(with ``--in-memory``) a transformers model that a :class:`~layerswap_fast.SwapSession` keeps equal
to the candidate. It returns a dict of metrics, merged into the manifest. ``--eval perplexity:FILE``
is built in: the mean next-token loss (and its exponential) over consecutive 128-token windows of
the file's text, in float32, deterministic (no sampling, no dropout), enough to rank candidates at
small scale on a CPU. torch and transformers are needed only when it runs.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .safe_read import decode_utf8, read_bytes

Evaluator = Callable[[Any], dict[str, Any]]
SEQ = 128


def token_windows(tokenizer: Any, text: str, rows: int | None = None, seq: int = SEQ) -> Any:
    """The text's tokens as consecutive ``seq``-token rows (the first ``rows`` of them), a torch tensor."""
    import torch
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq if rows is None else min(rows, len(ids) // seq)
    return torch.tensor(ids[:n * seq]).view(n, seq)


def mean_loss(model: Any, windows: Any, batch: int = 8) -> float:
    """Mean next-token loss of ``model`` over the rows of ``windows``, ``batch`` rows at a time."""
    import torch
    if len(windows) == 0:
        raise ConfigError("the text is shorter than one window of tokens")
    with torch.no_grad():
        total = sum(float(model(input_ids=windows[i:i + batch], labels=windows[i:i + batch]).loss)
                    * len(windows[i:i + batch]) for i in range(0, len(windows), batch))
    return total / len(windows)


def perplexity(text_file: str | os.PathLike[str], rows: int = 32) -> Evaluator:
    """The built-in evaluator: held-out loss and perplexity of ``text_file`` (its first ``rows``
    windows); the tokenizer is the candidate's, or for a model in memory that of the directory the
    model was loaded from (``name_or_path``)."""
    text = decode_utf8(read_bytes(text_file), str(text_file))

    def evaluate(target: Any) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import torch
        in_memory = not isinstance(target, (str, os.PathLike))
        source = getattr(target, "name_or_path", None) if in_memory else target
        if not source:
            raise ConfigError("perplexity of a model in memory needs the directory it was loaded from")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise ConfigError(f"perplexity needs a tokenizer, and {source} has none that loads: {e}") from None
        model = target if in_memory else AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        model.eval()
        loss = mean_loss(model, token_windows(tokenizer, text, rows))
        return {"loss": round(loss, 6), "perplexity": round(math.exp(loss), 4)}

    return evaluate


def load_evaluator(spec: str) -> Evaluator:
    """``perplexity:FILE`` or ``module:function`` (importable from the working directory or the path)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not kind or not rest:
        raise ConfigError(f"--eval must be module:function or perplexity:FILE, got {spec!r}")
    if kind == "perplexity":
        return perplexity(Path(rest))
    if os.getcwd() not in sys.path:  # the console script's path lacks it; `python -m` has it
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(kind)
    except ImportError as e:
        raise ConfigError(f"--eval {spec}: cannot import {kind!r}: {e}") from None
    function = getattr(module, rest, None)
    if not callable(function):
        raise ConfigError(f"--eval {spec}: {kind} has no function {rest!r}")
    return _checked(function, spec)


def _checked(function: Callable[[Any], Any], spec: str) -> Evaluator:
    def evaluate(target: Any) -> dict[str, Any]:
        result = function(target)
        if not isinstance(result, dict) or not all(isinstance(k, str) for k in result):
            raise ConfigError(f"--eval {spec} returned {type(result).__name__}, not a dict of metrics by name")
        return result

    return evaluate
