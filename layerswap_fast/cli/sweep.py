"""``layerswap-fast sweep SPEC -o DIR``: every candidate of a sweep spec, one line each."""

from __future__ import annotations

import click

from ..api import CHECKSUMS, DEVICES, IO_MODES, LINK_MODES, Candidate, sweep as run_sweep
from ..errors import ConfigError


def _line(c: Candidate) -> None:
    if c.status == "failed":
        click.echo(f"failed    {c.name}: {c.error}")
        return
    metrics = "".join(f"; {k} {v}" for k, v in c.metrics.items())
    click.echo(f"{c.status:<9} {c.name}: {c.computed} tensors computed, {c.shared} shared with earlier "
               f"candidates; {c.bytes_new / 1e6:.1f} MB new, {c.bytes_reused / 1e6:.1f} MB reused; "
               f"{c.seconds:.2f} s{metrics}")


@click.command("sweep")
@click.argument("spec")
@click.option("-o", "--output", "out", required=True, help="Directory of the candidates and sweep.json/sweep.csv.")
@click.option("--link", type=click.Choice(LINK_MODES), default="auto", show_default=True,
              help="How shards are reused: whole input shards, and whole shards of earlier candidates.")
@click.option("--threads", type=int, default=None, help="Worker threads (default: all cores).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where blends run: auto uses a CUDA GPU when there is one.")
@click.option("--checksum", type=click.Choice(CHECKSUMS), default=CHECKSUMS[0], show_default=True,
              help="Checksum each candidate records for verify (as for merge).")
@click.option("--io", type=click.Choice(IO_MODES), default="auto", show_default=True,
              help="How the kernels read the inputs (as for merge).")
@click.option("--dry-run", is_flag=True, help="Print the candidates and what each would write; write nothing.")
@click.option("--eval", "evaluate", default=None, metavar="MODULE:FUNCTION|perplexity:FILE",
              help="Evaluate each candidate: a function of its directory (or, with --in-memory, of the model) "
                   "returning a dict of metrics, or the held-out loss of a text file.")
@click.option("--in-memory", is_flag=True,
              help="Write no candidates: one loaded model is kept equal to each in turn and evaluated.")
@click.option("--ray", "ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run the candidates as Ray tasks: on the cluster at ADDRESS, or a local instance when none "
                   "is given. Every node must see the inputs and -o at the same paths.")
def sweep(spec: str, out: str, link: str, threads: int | None, device: str, checksum: str, io: str, dry_run: bool,
          evaluate: str | None, in_memory: bool, ray: str | None) -> None:
    """Layer swaps of many expert pairs under a grid of swap options (a YAML spec), each candidate
    in its own directory; a tensor computed for one candidate is copied, not computed, for the next."""
    found = run_sweep(spec, out, link=link, threads=threads, device=device, dry_run=dry_run, checksum=checksum,
                      io=io, evaluate=evaluate, in_memory=in_memory, ray=ray, report=_line)
    failed = [c for c in found if c.status == "failed"]
    if failed:
        raise ConfigError(f"{len(failed)} of {len(found)} candidates failed (first: {failed[0].name}: "
                          f"{failed[0].error}); the others are built and listed in {out}/sweep.json")
