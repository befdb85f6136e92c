"""Hugging Face Hub ids where a local path is asked: ``hf://ORG/REPO[@REV][/PATH]`` (a file or a folder of
the model repository ORG/REPO at revision REV, default ``main``; no PATH: the whole repository).

An id is resolved through ``huggingface_hub`` and its cache, under the library's own settings: ``HF_HOME``
/ ``HF_HUB_CACHE`` say where the cache lies, ``HF_HUB_OFFLINE=1`` forbids any network access (only what
the cache holds resolves). Otherwise a file or folder the cache lacks is downloaded, and a hub that cannot
be reached falls back to the cache (the library's rule). The result is the local path inside the cache's
snapshot folder ``.../snapshots/COMMIT/PATH`` and that commit hash, which ``run.yaml`` records
(:func:`revisions`). Each id is resolved once per process.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "hf://"
# ORG/REPO, then @REV (no '/'), then /PATH
_ID = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[^/]+))?(?:/(?P<path>.*))?$")


class HubError(ValueError):
    """A hub id that is malformed or cannot be resolved (not cached and not downloadable)."""


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str
    path: str  # inside the repository; '' for all of it

    @classmethod
    def parse(cls, text: str) -> HubRef:
        m = _ID.match(text)
        if m is None or ".." in (m["path"] or "").split("/"):
            raise HubError(f"{text!r} is not a hub id: write hf://ORG/REPO[@REVISION][/PATH]")
        return cls(m["repo"], m["rev"] or "main", (m["path"] or "").strip("/"))


@dataclass(frozen=True)
class Resolved:
    path: Path  # the local file or folder in the cache
    commit: str  # the commit hash the revision resolved to


_RESOLVED: dict[str, Resolved] = {}


def is_hub_id(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def resolve(hub_id: str) -> Resolved:
    """The local file or folder and commit of `hub_id` (downloaded into the cache when it lacks them and the
    hub may be used); one clear HubError otherwise."""
    if hub_id in _RESOLVED:
        return _RESOLVED[hub_id]
    ref = HubRef.parse(hub_id)
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    where = f"the Hugging Face cache {constants.HF_HUB_CACHE}"
    try:
        local = None
        if ref.path:
            try:  # a file
                local = Path(hf_hub_download(ref.repo, ref.path, revision=ref.revision))
            except Exception:  # not a file of the repository (or not cached): a folder, below
                local = None
        if local is None:
            patterns = [f"{ref.path}/*", f"{ref.path}/**"] if ref.path else None
            local = Path(snapshot_download(ref.repo, revision=ref.revision, allow_patterns=patterns)) / ref.path
    except Exception as e:
        lines = str(e).strip().splitlines()
        why = lines[0] if lines else type(e).__name__
        hint = "check the id and the network (or HF_TOKEN)"
        if constants.HF_HUB_OFFLINE:
            hint = f"HF_HUB_OFFLINE=1 forbids downloading: download it first (hf download {ref.repo}) or unset it"
        raise HubError(f"{hub_id}: not in {where} and not downloadable ({why}); {hint}") from None
    if not local.exists():
        raise HubError(f"{hub_id}: {ref.repo}@{ref.revision} in {where} has no file or folder {ref.path!r}")
    commit = _commit_of(local)
    _RESOLVED[hub_id] = Resolved(local, commit)
    return _RESOLVED[hub_id]


def _commit_of(local: Path) -> str:
    """The commit hash of a path inside a cache snapshot (``.../snapshots/COMMIT/...``)."""
    parts = local.parts
    if "snapshots" not in parts[:-1]:
        raise HubError(f"{local}: not inside a Hugging Face cache snapshot folder")
    return parts[len(parts) - 1 - parts[::-1].index("snapshots") + 1]


def local(path: str | Path | None) -> str | Path | None:
    """`path` itself, or the local path of a hub id (see :func:`resolve`)."""
    return str(resolve(path).path) if is_hub_id(path) else path


def hub_ids(data: Any) -> Iterable[str]:
    """Every hub id among the strings of a nested config mapping."""
    if isinstance(data, dict):
        for v in data.values():
            yield from hub_ids(v)
    elif isinstance(data, list | tuple):
        for v in data:
            yield from hub_ids(v)
    elif is_hub_id(data):
        yield data


def revisions(data: Any) -> dict[str, str]:
    """{hub id: commit hash} of every hub id in a config mapping (resolved if not yet): what ``run.yaml``
    records beside the config."""
    return {h: resolve(h).commit for h in sorted(set(hub_ids(data)))}
