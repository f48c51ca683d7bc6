"""The analysis pass: validate the inputs, then one streaming pass of row MAVs over every tensor.

Per tensor, one ``row_mav_file`` call of the device's :class:`~layerswap_fast.engine.backends.Backend`
reads the base once and every expert once, in chunks, so memory does not grow with the model.
Everything is validated before any data is read or anything written: every expert has the base's
tensor names and shapes and layer count. 0-element tensors and tensors of non-float dtypes are
skipped and listed in :attr:`DeltaStats.skipped`. An expert stored in another dtype than the base
gets one logged note per run (:func:`dtype_note`): its MAVs carry the coarser dtype's rounding.

An expert may be a PEFT LoRA adapter (a directory with ``adapter_config.json``): it stands for the
model base + s·B·A it makes, and :mod:`.lowrank` says what each of its tensors is and forms the row
MAVs of the low-rank updates; tensors it saves whole go through the backend with the full
experts', tensors it leaves alone have row MAVs 0. The base must be a full model.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _core
from ..dtypes import COMPUTE_DTYPE, FLOAT_DTYPES, TORCH_NAMES, UNIT_ROUNDOFF
from ..engine.backends import DEVICES, Backend, make_backend
from ..errors import CheckpointError, ConfigError, MismatchError
from ..formats.adapter import Adapter, base_model_of, check_against_base, is_adapter
from ..formats.checkpoint import IO_MODES, Checkpoint, open_checkpoint
from ..formats.hub import parse_hub_id
from ..formats.output import check_output, guarded_paths, output_location, publish, staging_directory
from ..plan.layers import classify, count_layers
from . import lowrank
from .files import ROWS_DIR, NpySink, RowFiles, write_stats
from .heatmap import HeatmapFigure, prepare_in_background
from .stats import DeltaStats, ExpertStats, InputRef, TensorStat, check_expert_name

log = logging.getLogger("layerswap_fast")
PathLike = str | os.PathLike[str]
Progress = Callable[[int, int], None]  # (bytes just read, total bytes to read)
RowSink = Callable[[str, str, np.ndarray], None]  # (expert, tensor, row MAVs)


def input_ref(ckpt: Checkpoint) -> InputRef:
    return InputRef(str(Path(ckpt.path).resolve()), ckpt.fingerprint(), ckpt.content_sample(), ckpt.hub_id,
                    ckpt.revision)


def open_expert(path: PathLike) -> Checkpoint:
    """An expert: a full checkpoint, or a LoRA adapter (an :class:`Adapter`, a checkpoint too)."""
    return Adapter(path) if is_adapter(path) else open_checkpoint(path)


def open_base(path: PathLike) -> Checkpoint:
    """The base, which must be a full model: ConfigError for a LoRA adapter."""
    if is_adapter(path):
        named = base_model_of(path)
        hint = f" (this adapter was trained on {named})" if named else ""
        raise ConfigError(f"the base {path} is a LoRA adapter: the base must be a full model, the one the "
                          f"experts were trained from{hint}")
    return open_checkpoint(path)


def adapter_counts(expert: Checkpoint, tensors: Sequence[str]) -> dict[str, int] | None:
    """For an adapter, how many of ``tensors`` it updates by s·B·A (``low_rank``), saves whole
    (``replaced``) and leaves to the base (``untouched``); None for a full expert."""
    if not isinstance(expert, Adapter):
        return None
    kinds = Counter(lowrank.how(expert, t) for t in tensors)
    return {"low_rank": kinds[lowrank.LOWRANK], "replaced": kinds[lowrank.WHOLE], "untouched": kinds[lowrank.UNTOUCHED]}


def _default_name(path: Path) -> str:
    hub = None if os.path.lexists(path) else parse_hub_id(str(path))
    if hub is not None:  # org/name@revision: the model's name, as for its snapshot below
        return hub[0].rpartition("/")[2]
    p = Path(os.path.abspath(path))
    if p.is_file() or p.suffix == ".safetensors":
        p = p.parent
    # a Hugging Face cache snapshot (models--org--name/snapshots/<hash>): the model's name
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name.split("--")[-1] or "expert"
    return p.name or "expert"


def expert_names(experts: Sequence[PathLike] | Mapping[str, PathLike]) -> list[tuple[str, Path]]:
    """(name, path) per expert: the mapping's keys, else the directory names made unique
    (``task``, ``task-2``, ...)."""
    if isinstance(experts, (str, os.PathLike)):
        experts = [experts]
    if isinstance(experts, Mapping):
        out = []
        for name, path in experts.items():
            check_expert_name(name)
            out.append((name, Path(path)))
        return out
    paths = [Path(p) for p in experts]
    used: set[str] = set()
    out = []
    for p in paths:
        stem = _default_name(p)
        name, k = stem, 2
        while name in used:
            name, k = f"{stem}-{k}", k + 1
        used.add(name)
        out.append((name, p))
    return out


def _validate(base: Checkpoint, experts: Mapping[str, Checkpoint]) -> int:
    """Names, shapes and layer counts agree with the base; returns the layer count."""
    num_layers = count_layers(base.names, base.config, f"base {base.path}")
    base_names = base.specs
    for name, ckpt in experts.items():
        where = f"expert {name!r} ({ckpt.path})"
        if isinstance(ckpt, Adapter):  # the model it makes has the base's names and layers
            check_against_base(ckpt, list(base_names.values()), f"expert {name!r}")
            continue
        for tensor, spec in base_names.items():
            other = ckpt.specs.get(tensor)
            if other is None:
                raise MismatchError(f"{where} has no tensor {tensor!r}, which the base has")
            if other.shape != spec.shape:
                raise MismatchError(f"tensor {tensor!r} has shape {list(other.shape)} in {where} "
                                    f"but {list(spec.shape)} in the base")
        for tensor in ckpt.specs:
            if tensor not in base_names:
                raise MismatchError(f"{where} has tensor {tensor!r}, which the base lacks")
        n = count_layers(ckpt.names, ckpt.config, where)
        if n != num_layers:
            raise MismatchError(f"{where} has {n} layers but the base has {num_layers}")
    return num_layers


def analyze(
    base: PathLike,
    experts: Sequence[PathLike] | Mapping[str, PathLike],
    out_dir: PathLike | None = None,
    *,
    rows: bool = False,
    device: str = "auto",
    threads: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
    backend: Backend | None = None,
    io: str = "auto",
) -> DeltaStats:
    """Row-MAV statistics of ``experts`` against ``base``, in one streaming pass.

    ``experts``: paths (named after their directories, made unique: ``task``, ``task-2``) or a
    mapping name → path; an expert may be a LoRA adapter of ``base`` (see :mod:`.lowrank`), the
    base must be a full model. Everything is validated (names, shapes, layer counts, the output
    location) before any tensor data is read. With ``out_dir``, writes ``mav.csv``,
    ``summary.json``, ``heatmap.png`` (and ``rows/`` when ``rows``) into a staging directory that
    is renamed into place at the end, so ``out_dir`` appears complete or not at all; an existing
    ``out_dir`` is replaced only with ``force``. Without ``out_dir``, ``rows`` keeps the row MAVs
    in memory (:meth:`DeltaStats.row_mavs`). ``device``: ``auto`` (a CUDA GPU when present),
    ``cpu`` (the C++ core, ``threads`` workers, default all cores) or ``cuda``.
    ``progress(n, total)`` is called after each tensor with the bytes it read. ``backend`` (for
    tests) replaces the device's backend: anything with the ``row_mav_file`` method of
    :class:`~layerswap_fast.engine.backends.Backend`; the caller closes it. ``io``: how the
    shards are read (:data:`~layerswap_fast.formats.checkpoint.IO_MODES`).
    """
    named = expert_names(experts)
    if not named:
        raise ConfigError("analyze needs at least one expert")
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if io not in IO_MODES:
        raise ConfigError(f"io must be one of {', '.join(IO_MODES)}, got {io!r}")
    opened: list[Checkpoint] = []
    try:
        base_ckpt = open_base(base)
        opened.append(base_ckpt)
        ckpts: dict[str, Checkpoint] = {}
        for name, path in named:
            ckpts[name] = open_expert(path)
            opened.append(ckpts[name])
        num_layers = _validate(base_ckpt, ckpts)
        for c in opened:
            c.set_io(io)
        out_path = output_location(out_dir) if out_dir is not None else None
        if out_path is not None:
            check_output(out_path, guarded_paths(opened, []), force, 0)
            # matplotlib is slow to import and to lay a figure out: both happen while the pass runs
            figure = prepare_in_background(list(ckpts), num_layers)
        owned = backend is None
        engine = make_backend(device, threads) if backend is None else backend
        try:
            if out_path is None:
                return _in_memory(base_ckpt, ckpts, num_layers, engine, rows, progress)
            return _to_directory(base_ckpt, ckpts, num_layers, engine, rows, progress, out_path, force, figure)
        finally:
            if owned:
                engine.close()
    finally:
        for c in opened:
            c.close()


def _in_memory(base: Checkpoint, experts: Mapping[str, Checkpoint], num_layers: int, engine: Backend,
               rows: bool, progress: Progress | None) -> DeltaStats:
    kept: dict[tuple[str, str], np.ndarray] = {}
    stats = _run(base, experts, num_layers, engine,
                 (lambda e, t, r: kept.__setitem__((e, t), r)) if rows else None, progress)
    stats._rows = kept
    return stats


def _to_directory(base: Checkpoint, experts: Mapping[str, Checkpoint], num_layers: int, engine: Backend,
                  rows: bool, progress: Progress | None, out_path: Path, force: bool,
                  figure: Callable[[], HeatmapFigure | None]) -> DeltaStats:
    with staging_directory(out_path) as tmp:
        sink = NpySink(tmp / ROWS_DIR, list(experts)) if rows else None
        stats = _run(base, experts, num_layers, engine, sink, progress)
        stats.rows_saved = rows
        write_stats(stats, tmp, figure())
        publish(tmp, out_path, force)
    stats.out_dir = out_path
    if rows:
        stats._rows = RowFiles(out_path / ROWS_DIR)
    return stats


@dataclass
class _Item:
    tensor: str
    rows: int
    cols: int
    nbytes: int


def _plan(base: Checkpoint, experts: Mapping[str, Checkpoint]) -> tuple[list[_Item], list[tuple[str, str]]]:
    todo, skipped = [], []
    for name, spec in base.specs.items():
        dtypes = [spec.dtype] + [d for c in experts.values() for d in lowrank.read_dtypes(c, name)]
        bad = [d for d in dtypes if d not in FLOAT_DTYPES]
        if bad:
            skipped.append((name, f"dtype {bad[0]} (row MAV reads {', '.join(FLOAT_DTYPES)})"))
            continue
        if spec.numel == 0:
            skipped.append((name, f"no elements (shape {list(spec.shape)})"))
            continue
        rows = spec.shape[0] if len(spec.shape) >= 2 else 1
        backend_reads_base = any(lowrank.how(c, name) == lowrank.WHOLE for c in experts.values())
        todo.append(_Item(name, rows, spec.numel // rows, (spec.nbytes if backend_reads_base else 0)
                          + sum(lowrank.bytes_read(c, name, spec.nbytes) for c in experts.values())))
    return todo, skipped


def _dtypes(ckpt: Checkpoint, todo: Sequence[_Item], base: Checkpoint) -> dict[str, int]:
    """How many analysed tensors ``ckpt`` keeps in each dtype (an adapter: see
    :func:`.lowrank.stored_dtype`)."""
    return dict(Counter(lowrank.stored_dtype(ckpt, item.tensor, base.specs[item.tensor].dtype) for item in todo))


def dtype_note(base: Checkpoint, experts: Mapping[str, Checkpoint], tensors: Sequence[str]) -> str | None:
    """One line for the user when an expert stores ``tensors`` in another dtype than the base: its
    row MAVs then hold the rounding of the coarser dtype besides what fine-tuning changed. Only
    tensors stored whole count (an adapter's too): a low-rank update is the change itself, whatever
    the dtype of its factors, and is not a difference of rounded weights."""
    said, coarser = [], set()
    for name, ckpt in experts.items():
        pairs = Counter((ckpt.specs[t].dtype, base.specs[t].dtype) for t in tensors
                        if lowrank.saved(ckpt, t) and ckpt.specs[t].dtype != base.specs[t].dtype)
        for (mine, theirs), n in sorted(pairs.items()):
            said.append(f"expert {name!r} is {mine} where the base is {theirs} ({n} tensors)")
            coarser.add(max(mine, theirs, key=lambda d: UNIT_ROUNDOFF[d]))
    if not said:
        return None
    floors = ", ".join(f"{d}: 2^{int(math.log2(UNIT_ROUNDOFF[d]))} ≈ {UNIT_ROUNDOFF[d]:.1e} of each weight's magnitude"
                       for d in sorted(coarser, key=lambda d: -UNIT_ROUNDOFF[d]))
    return (f"the inputs differ in dtype: {'; '.join(said)}. The row MAVs compare them in "
            f"{TORCH_NAMES[COMPUTE_DTYPE]} ({COMPUTE_DTYPE}), so values below the rounding of the coarser "
            f"dtype ({floors}) are noise, not fine-tuning")


def _run(base: Checkpoint, experts: Mapping[str, Checkpoint], num_layers: int, engine: Backend,
         sink: RowSink | None, progress: Progress | None) -> DeltaStats:
    start = time.perf_counter()
    todo, skipped = _plan(base, experts)
    total = sum(item.nbytes for item in todo)
    note = dtype_note(base, experts, [item.tensor for item in todo])
    if note is not None:
        log.warning(note)
    names = list(experts)
    per_expert: dict[str, list[TensorStat]] = {n: [] for n in names}
    threads = getattr(engine, "threads", 0) or 0  # the CPU backend's workers, for an adapter's differences
    for item in todo:
        try:
            result = _row_mavs(base, experts, item, engine, threads)
        except _core.CoreError as e:
            raise CheckpointError(f"reading tensor {item.tensor!r}: {e}") from None
        info = classify(item.tensor)
        for i, n in enumerate(names):
            r = result[i]
            per_expert[n].append(TensorStat(item.tensor, info.layer, info.kind, item.rows,
                                            float(r.mean()), float(r.max())))
            if sink is not None:
                sink(n, item.tensor, r.copy())
        if progress is not None:
            progress(item.nbytes, total)
    for ckpt in [base, *experts.values()]:
        ckpt.check_unchanged("analysis")
    analysed = [item.tensor for item in todo]
    return DeltaStats(
        experts={n: ExpertStats(n, per_expert[n], input_ref(experts[n]), _dtypes(experts[n], todo, base),
                                adapter_counts(experts[n], analysed)) for n in names},
        num_layers=num_layers, base=input_ref(base), base_dtypes=_dtypes(base, todo, base), skipped=skipped,
        seconds=time.perf_counter() - start, bytes_read=total)


def _row_mavs(base: Checkpoint, experts: Mapping[str, Checkpoint], item: _Item, engine: Backend,
              threads: int) -> np.ndarray:
    """float64 (experts, rows): the row MAVs of one tensor for every expert. Experts that store it
    whole go through the backend together (the base read once for all of them); low-rank updates
    are formed by :func:`.lowrank.delta_row_mavs`; an untouched tensor's row MAVs are 0."""
    names = list(experts)
    result = np.zeros((len(names), item.rows), dtype=np.float64)
    kinds = [lowrank.how(experts[n], item.tensor) for n in names]
    whole = [i for i, k in enumerate(kinds) if k == lowrank.WHOLE]
    if whole:
        bspec = base.specs[item.tensor]
        especs = [experts[names[i]].specs[item.tensor] for i in whole]
        got = engine.row_mav_file(
            [(experts[names[i]].input_file(s.file), s.offset) for i, s in zip(whole, especs)],
            [s.dtype for s in especs],
            (base.input_file(bspec.file), bspec.offset), bspec.dtype, item.rows, item.cols)
        result[whole] = np.asarray(got, dtype=np.float64).reshape(len(whole), item.rows)
    for i, kind in enumerate(kinds):
        if kind == lowrank.LOWRANK:
            adapter = experts[names[i]]
            assert isinstance(adapter, Adapter)
            result[i] = lowrank.delta_row_mavs(adapter, item.tensor, base, item.rows, item.cols, threads=threads)
    return result


__all__ = ["analyze", "expert_names", "input_ref", "Progress"]
