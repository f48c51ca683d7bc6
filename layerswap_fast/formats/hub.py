"""Hugging Face hub ids as checkpoint paths: ``org/name`` or ``org/name@revision`` names a snapshot
directory of the local Hugging Face cache (``models--org--name/snapshots/<commit>``).

Only the cache is read: nothing is downloaded and no request is made (``local_files_only``), so a
merge from hub ids works offline and never waits on the network; what is missing is reported with
the command that fetches it. A local file or directory of the same name wins, so a user's
``./org/name`` keeps meaning that directory. huggingface_hub is imported only when a hub id is met:
most inputs are local paths, and the command line's start-up time counts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..safe_read import show_path

# one slash: "a/b/c" and "/abs" stay paths; the revision is a commit or a ref name (refs/pr/1), whose
# components may not be "." or "..", since it becomes a path below the cache's refs/
_HUB_ID = re.compile(r"([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(\w[\w.-]*(?:/\w[\w.-]*)*))?", re.ASCII)
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubSnapshot:
    """A model of the cache at one commit: ``path`` is its snapshot directory."""

    hub_id: str
    revision: str
    path: Path

    @property
    def pinned(self) -> str:
        """``org/name@<commit>``: names this snapshot even after the cache's ``main`` moves."""
        return f"{self.hub_id}@{self.revision}"


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when ``text`` is spelled as a hub id, else None."""
    match = _HUB_ID.fullmatch(text)
    if match is None:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(match[1])
    except HFValidationError:  # "a--b", "a..b", "name.git": the Hub's own rules
        return None
    return match[1], match[2]


def hub_cache() -> Path:
    """The cache directory huggingface_hub uses, from the environment as it is now (its
    ``constants.HF_HUB_CACHE`` was fixed when it was imported)."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "huggingface")
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def find_snapshot(path: str | os.PathLike[str]) -> HubSnapshot | None:
    """The cached snapshot ``path`` names when it is a hub id; None when it is not spelled as one
    or a file or directory of that name exists. CheckpointError when the model or the revision is
    not in the cache."""
    text = os.fspath(path)
    if not isinstance(text, str) or os.path.lexists(text) or _HUB_ID.fullmatch(text) is None:
        return None  # the regex first: no huggingface_hub import for a path that is merely missing
    parsed = parse_hub_id(text)
    return None if parsed is None else cached_snapshot(*parsed)


def cached_snapshot(hub_id: str, revision: str | None = None) -> HubSnapshot:
    """The snapshot of ``hub_id`` at ``revision`` (a full commit hash, a branch or a tag; the
    cache's ``main`` when None), from the cache alone."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache()
    try:
        folder = Path(str(snapshot_download(hub_id, revision=revision, cache_dir=cache, local_files_only=True)))
    except (LocalEntryNotFoundError, IsADirectoryError) as e:  # a directory: "pr" of refs/pr/1
        raise CheckpointError(_not_cached(hub_id, revision, cache, e)) from None
    expected = Path(cache).resolve() / _repo_folder(hub_id) / "snapshots" / folder.name
    if folder != expected or not _COMMIT.fullmatch(folder.name):
        raise CheckpointError(f"{hub_id}: refs/{revision or 'main'} of {_repo_folder(hub_id)} in the Hugging Face "
                              f"cache {show_path(cache)} names no snapshot (it holds {folder.name!r})")
    return HubSnapshot(hub_id, folder.name, folder)


def _repo_folder(hub_id: str) -> str:
    return "models--" + hub_id.replace("/", "--")


def _not_cached(hub_id: str, revision: str | None, cache: Path, error: Exception) -> str:
    spec = hub_id if revision is None else f"{hub_id}@{revision}"
    fetch = f"hf download {hub_id}" + ("" if revision is None else f" --revision {revision}")
    if getattr(error, "snapshot_path", None):  # IncompleteSnapshotError: a listing says files are missing
        what = f"its snapshot in the Hugging Face cache {show_path(cache)} is incomplete"
    elif not (cache / _repo_folder(hub_id)).is_dir():
        what = f"the Hugging Face cache {show_path(cache)} has no model {hub_id}"
    else:
        what = f"the Hugging Face cache {show_path(cache)} has no revision {revision or 'main'} of {hub_id}"
    return f"checkpoint {spec} is not a local path, and {what}; fetch it with: {fetch}"


def pinned(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """``org/name@<commit>`` when ``path`` names a cached model, else ``path`` itself: a model that
    is not cached is left for opening it to report, in the words of :func:`find_snapshot`."""
    try:
        snapshot = find_snapshot(path)
    except CheckpointError:
        return path
    return path if snapshot is None else snapshot.pinned
