"""``mergekit-yaml CONFIG OUT``: mergekit's command, with its common options, over
:func:`layerswap_fast.api.run_mergekit_config`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from .. import api
from .flags import click_option, stack
from .progress import progress_bar

#: the write options of our other commands that mergekit-yaml takes too (mergekit has none of them)
OUR_OPTIONS = ("threads", "link", "sync", "checksum", "io")


@click.command("mergekit-yaml")
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
              help="Copy the tokenizer of the base model (or the first model) beside the output.")
@click.option("--out-shard-size", default="5B", show_default=True,
              help="Largest output shard, in bytes (K, M, B suffixes: thousands, millions, billions).")
@click.option("--random-seed", type=int, default=None, help="Seed for the random methods (recorded).")
@click.option("--cuda", is_flag=True, help="Accepted for mergekit's sake; mergekit's ops compute on the CPU here.")
@click.option("--allow-crimes", is_flag=True, help="Accepted for mergekit's sake; architectures are not checked.")
@click.option("--lazy-unpickle", is_flag=True, help="Accepted for mergekit's sake; reading is always lazy.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--dry-run", is_flag=True, help="Plan and check, write nothing.")
@click.option("-v", "--verbose", is_flag=True, help="Say more.")
@stack(*(click_option(o) for o in api.WRITE_OPTIONS if o.name in OUR_OPTIONS))
def mergekit_yaml(config: Path, out: Path, copy_tokenizer: bool, out_shard_size: str, random_seed: int | None,
                  cuda: bool, allow_crimes: bool, lazy_unpickle: bool, force: bool, dry_run: bool,
                  verbose: bool, **ours: Any) -> None:
    """Run a mergekit YAML CONFIG into OUT, with mergekit 0.1.5's numbers, streamed."""
    if verbose:
        logging.getLogger("layerswap_fast").setLevel(logging.DEBUG)
    with progress_bar() as progress:
        result = api.run_mergekit_config(config, out, copy_tokenizer=copy_tokenizer, random_seed=random_seed,
                                         shard_size=api.parse_kmb(out_shard_size), force=force, dry_run=dry_run,
                                         progress=progress, **ours)
    click.echo(result.summary(out))
