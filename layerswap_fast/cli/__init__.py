"""``layerswap-fast``: the command line over the Python API. It parses, calls and prints.

The commands that merge are built from the method registry (``api.METHODS``): each method's
declared options become its flags. Every failure a user can cause ends as one line ``error: ...``
and exit status 2.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import click

from ..errors import CoreError, LayerswapError


class _Group(click.Group):
    """Every failure a user can cause ends as one line ``error: ...`` and exit status 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        _log_notes_to_stderr()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            rv = super().main(*args, **kwargs)
        except LayerswapError as e:
            _error_line(e.render(_flag))
        except (CoreError, click.ClickException) as e:
            _error_line(e.format_message() if isinstance(e, click.ClickException) else str(e))
        except OSError as e:  # a path the OS refuses, wherever it was met: the API cleaned up already
            _error_line(f"{e.filename!r}: {e.strerror or e}" if e.filename is not None else str(e))
        except (_Interrupted, KeyboardInterrupt, click.exceptions.Abort):
            click.echo("error: interrupted; nothing was written", err=True)
            sys.exit(130)
        finally:
            signal.signal(signal.SIGTERM, previous)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # before click turns it into Abort with a stray blank line
            raise _Interrupted from None


def _flag(name: str) -> str:
    """The flag of the option an API error names."""
    from .. import api

    declared = {o.name: o.cli_flag for m in api.METHODS.values() for o in (*m.options, *api.WRITE_OPTIONS)}
    return declared.get(name, "--" + name.replace("_", "-"))


def _error_line(message: str) -> None:
    """Print ``error: MESSAGE`` as one line and exit 2. Control characters (a newline in a path)
    and undecodable bytes (surrogate escapes in a path from argv) are escaped, never printed."""
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    click.echo(f"error: {safe}", err=True)
    sys.exit(2)


class _Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the API's cleanup has already run."""


def _log_notes_to_stderr() -> None:
    logger = logging.getLogger("layerswap_fast")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="layerswap-fast")
def main() -> None:
    """Layer swapping (arXiv 2410.01335) of safetensors checkpoints, streamed: the bottom and top
    layers of a language expert replace those of a task expert, transition layers are blended,
    non-layer parameters averaged. Also the paper's baselines: soups, task arithmetic, TIES, reverts."""


def run() -> None:
    """The console script: :func:`main`, then exit without tearing the interpreter down.

    By then the output is published and every file is closed; freeing each module and object one
    by one would only add to the time of every command."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _register() -> None:
    from .analyze import analyze
    from .commands import add_commands
    from .sweep import sweep

    add_commands(main)
    main.add_command(analyze)
    main.add_command(sweep)


_register()
