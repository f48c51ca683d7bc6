"""Helpers shared by the bench scripts: the synthetic trio cache, timed subprocesses, machine facts."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

# This module must stay light (no numpy at import time): a process started by run_timed() is
# charged by Linux with the peak RSS of its parent at the time it was spawned (vfork + exec
# carries the parent's high-water mark into the child's ru_maxrss), so the timing parent keeps
# its own footprint small and leaves the trio generation to a child (make_trio.py).

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / "bench" / "out"
MARKER = "trio.json"


_SYN: ModuleType | None = None


def load_synthetic() -> ModuleType:
    """``layerswap_fast.synthetic``; loaded from its file when the package itself cannot be
    imported (e.g. the C++ core is not built yet): the generator needs only numpy."""
    global _SYN
    if _SYN is not None:
        return _SYN
    try:
        from layerswap_fast import synthetic
        _SYN = synthetic
        return synthetic
    except ImportError:
        path = REPO / "layerswap_fast" / "synthetic.py"
        spec = importlib.util.spec_from_file_location("_layerswap_synthetic", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _SYN = module
        return module


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int) -> int:
    """``5GB`` -> 5*10**9, ``512MiB`` -> 512*2**20 (as layerswap_fast.synthetic.parse_size)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", value, re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"cannot read size {value!r}: use a number with a unit, like 5GB or 500MB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def trio_dirname(shape: str, layers: int | None = None, dtype: str = "BF16") -> str:
    """``1b``, ``70b-slice-16l``, ``8b-f32``: the default directory name of a trio."""
    name = shape
    if layers is not None:
        name += f"-{layers}l"
    if dtype.upper() != "BF16":
        name += f"-{dtype.lower()}"
    return name


def generator_version() -> int:
    """synthetic.GENERATOR_VERSION, read from the source: importing the generator loads numpy,
    and every child this process starts is charged its peak RSS (36 MB instead of 15 for `true`)."""
    text = (REPO / "layerswap_fast" / "synthetic.py").read_text()
    return int(re.search(r"^GENERATOR_VERSION = (\d+)$", text, re.M).group(1))


def trio_params(shape: str, *, dtype: str = "BF16", shard_size: int = 5 * 10**9,
                layers: int | None = None, with_base: bool = True, seed: int = 0) -> dict:
    return {"generator_version": generator_version(), "shape": shape, "dtype": dtype.upper(),
            "shard_size": int(shard_size), "num_layers": layers, "with_base": bool(with_base),
            "seed": int(seed), "experts": ["task", "language"]}


def _complete(model: Path) -> bool:
    index = model / "model.safetensors.index.json"
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
    return (model / "config.json").is_file() and all((model / s).is_file() for s in shards)


def existing_trio(out: Path, params: dict) -> bool:
    """Whether ``out`` holds a complete trio made with ``params`` (a trio with a base also serves
    a request without one)."""
    try:
        have = json.loads((out / MARKER).read_text())["params"]
    except (OSError, ValueError, KeyError):
        return False
    same = {k: v for k, v in have.items() if k != "with_base"} == \
        {k: v for k, v in params.items() if k != "with_base"}
    if not same or (params["with_base"] and not have.get("with_base")):
        return False
    roles = (["base"] if params["with_base"] else []) + params["experts"]
    return all(_complete(out / r) for r in roles)


@dataclass
class TrioResult:
    paths: dict[str, Path]
    generated: bool
    seconds: float = 0.0
    nbytes: int = 0


def shard_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.glob("*.safetensors"))


def ensure_trio(out: Path, shape: str, *, dtype: str = "BF16", shard_size: int = 5 * 10**9,
                layers: int | None = None, with_base: bool = True, seed: int = 0,
                force: bool = False) -> TrioResult:
    """Generate the trio into ``out`` unless a complete one with the same parameters is there.
    The ``trio.json`` marker is removed first and written last."""
    params = trio_params(shape, dtype=dtype, shard_size=shard_size, layers=layers,
                         with_base=with_base, seed=seed)
    roles = (["base"] if with_base else []) + params["experts"]
    if not force and existing_trio(out, params):
        return TrioResult({r: out / r for r in roles}, generated=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    if not with_base and (out / "base").exists():
        shutil.rmtree(out / "base")  # a stale base of other parameters must not look current
    t0 = time.perf_counter()
    paths = load_synthetic().make_trio(out, shape, dtype=dtype, shard_size=shard_size, seed=seed,
                          num_layers=layers, with_base=with_base)
    seconds = time.perf_counter() - t0
    nbytes = sum(shard_bytes(p) for p in paths.values())
    (out / MARKER).write_text(json.dumps({"params": params, "seconds": round(seconds, 3),
                                          "bytes": nbytes}, indent=2) + "\n")
    return TrioResult(paths, generated=True, seconds=seconds, nbytes=nbytes)


def self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


@dataclass
class Timed:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str
    cpu_s: float  # user + sys of the child


def run_timed(cmd: list[str], cwd: Path | None = None, capture: bool = True,
              preexec: Callable[[], None] | None = None) -> Timed:
    """Run ``cmd``; wall seconds, CPU seconds and the child's peak RSS (``wait4``; ru_maxrss is KiB
    on Linux). ``capture=False`` sends stdout to /dev/null (for ``cat`` of gigabytes); ``preexec``
    runs in the child before the command (:func:`memory_cgroup`).

    The RSS is never below this process's own peak at the time of the call (see the note at the
    top): measure ``["true"]`` to know that floor."""
    with open(os.devnull, "rb") as stdin, open(os.devnull, "wb") as null, \
            _tempfile() as out, _tempfile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=out if capture else null, stderr=err, cwd=cwd,
                                preexec_fn=preexec)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Timed(seconds, usage.ru_maxrss * 1024 / 1e6, proc.returncode,
                     out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                     usage.ru_utime + usage.ru_stime)


def _tempfile():
    import tempfile
    return tempfile.TemporaryFile()


def sync() -> None:
    subprocess.run(["sync"], check=False)


def drop_caches() -> bool:
    """Write back and drop the page cache; False without the permission (not root)."""
    sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def round_order(methods: list[str], round_: int) -> list[str]:
    """Methods forwards in even rounds, backwards in odd ones. On a VM that returns free memory to
    its host, whichever command must allocate fresh page cache right after another one filled it
    pays for host faults (seen: the same copy 0.55 s or 5.9 s), so no method may always follow
    the same one."""
    return methods if round_ % 2 == 0 else methods[::-1]


def trio_in_child(out: Path, shape: str, *, shard_size: str = "5GB", layers: int | None = None,
                  with_base: bool = True) -> dict[str, Path]:
    """The trio in ``out``, generated first (if missing) by ``make_trio.py`` in a child process:
    a timing parent must stay small, since every child it starts is charged its peak RSS (the
    generator needs numpy and writes gigabytes)."""
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "make_trio.py"), "--shape", shape,
           "--out", str(out), "--shard-size", shard_size] + (["--layers", str(layers)] if layers else []) + (
               [] if with_base else ["--no-base"])
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"generating the {shape} trio in {out} failed")
    params = trio_params(shape, shard_size=parse_size(shard_size), layers=layers, with_base=with_base)
    if not existing_trio(out, params):
        sys.exit(f"make_trio.py left no complete {shape} trio in {out}")
    return {r: out / r for r in (["base"] if with_base else []) + params["experts"]}


def machine_info(workdir: Path) -> dict:
    """nproc, RAM, kernel, CPU model and the workdir's filesystem."""
    info: dict[str, object] = {"nproc": len(os.sched_getaffinity(0)), "kernel": platform.release(),
                               "python": platform.python_version()}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gb"] = round(int(line.split()[1]) * 1024 / 1e9, 1)
                break
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        df = subprocess.run(["df", "-T", "-B1", str(workdir)], capture_output=True, text=True,
                            check=True).stdout.splitlines()[-1].split()
        info["filesystem"] = df[1]
        info["device"] = df[0]
        info["disk_free_gb"] = round(int(df[4]) / 1e9, 1)
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        pass
    try:
        info["cp"] = subprocess.run(["cp", "--version"], capture_output=True, text=True,
                                    check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        pass
    return info


def find_cli() -> str | None:
    """The ``layerswap-fast`` executable next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "layerswap-fast"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("layerswap-fast")


def used_bytes(path: Path) -> int:
    """Bytes the filesystem has given out: on a bench's own XFS (:func:`xfs_mount`: nothing else
    writes there) its used blocks, so shared extents count once; elsewhere the blocks of the files
    under ``path`` (each inode once), since other processes write to a shared disk."""
    sync()
    if _on_bench_xfs(path):
        # XFS frees a deleted file's extents in the background: wait until the count settles
        used = -1
        for _ in range(50):
            st = os.statvfs(path)
            now = (st.f_blocks - st.f_bfree) * st.f_frsize
            if now == used:
                break
            used = now
            time.sleep(0.1)
            sync()
        return used
    seen, total = set(), 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


_BENCH_XFS: set[Path] = set()


def _on_bench_xfs(path: Path) -> bool:
    resolved = Path(path).resolve()
    return any(resolved == m or m in resolved.parents for m in _BENCH_XFS)


def xfs_mount(workdir: Path, gigabytes: int, direct_io: bool = False) -> Path:
    """An XFS filesystem with reflink in a sparse loop file of ``gigabytes`` GB under ``workdir``,
    mounted at ``workdir/xfs`` (made once; needs root and mkfs.xfs). ``direct_io``: the loop
    device reads and writes its file with O_DIRECT, so that the XFS's pages are the only copy in
    memory (else the loop file's own page cache serves what the XFS's evicted)."""
    image, mount = workdir / "xfs.img", workdir / "xfs"
    mount.mkdir(parents=True, exist_ok=True)
    if not os.path.ismount(mount):
        with open(image, "wb") as f:
            f.truncate(gigabytes * 10**9)
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    loop = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout.split(":")[0]
    if loop:
        subprocess.run(["losetup", f"--direct-io={'on' if direct_io else 'off'}", loop], check=True)
    _BENCH_XFS.add(mount.resolve())
    return mount


def memory_cgroup(limit_mb: int) -> Callable[[], None]:
    """A ``preexec`` for :func:`run_timed` that puts the child in a memory cgroup of ``limit_mb``
    MB, made under this process's own (cgroup v2, or v1's memory controller). Its page cache is
    charged there too, so the child works as on a machine whose page cache holds no more: the way
    to measure "more bytes than the page cache absorbs" without that many bytes on disk."""
    own = next((line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.split(":")[1] in ("memory", "")), None)
    v1 = Path("/sys/fs/cgroup/memory")
    root = v1 if v1.is_dir() else Path("/sys/fs/cgroup")
    group = root / (own or "/").lstrip("/") / "layerswap-bench"
    group.mkdir(exist_ok=True)
    if v1.is_dir():
        (group / "memory.limit_in_bytes").write_text(str(limit_mb << 20))
    else:
        (group / "memory.max").write_text(str(limit_mb << 20))
    procs = group / "cgroup.procs"
    return lambda: procs.write_text(str(os.getpid()))
