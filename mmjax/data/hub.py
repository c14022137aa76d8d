"""Files of Hugging Face Hub repositories, through the local hub cache.

`snapshot_folder` returns the cached snapshot folder of a repository holding a
given set of files: from the cache when it has them, else downloaded into it
(where there is network). The environment is read when it is called:
`HF_HUB_CACHE` (else `HF_HOME/hub`, else huggingface_hub's default) is the
cache, and `HF_HUB_OFFLINE=1` forbids downloads. When the files are neither
cached nor fetchable, one ConfigError names the repository, the files, the
cache folder and the command that fetches them.
"""
from __future__ import annotations

import os
from typing import Sequence

from mmjax.errors import ConfigError

_TRUE = ("1", "ON", "YES", "TRUE")


def cache_dir() -> str:
    """The hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else huggingface_hub's
    default (`~/.cache/huggingface/hub`)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def offline() -> bool:
    """Whether downloads are off (`HF_HUB_OFFLINE` set to 1/on/yes/true)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def _has(folder: str, needed: Sequence[Sequence[str]]) -> bool:
    return any(all(os.path.isfile(os.path.join(folder, f)) for f in files) for files in needed)


def snapshot_folder(repo_ids: Sequence[str], patterns: Sequence[str],
                    needed: Sequence[Sequence[str]], what: str) -> str:
    """Local folder of a repository's snapshot that holds one of the file sets `needed`.

    Args:
      repo_ids: the repository (`"ORG/NAME"`), then older names of it: each is tried in
        turn (online the first is fetched; offline the first found in the cache wins).
      patterns: the file names (or globs) downloaded; nothing else is fetched.
      needed: alternative sets of file names (e.g. `[["tokenizer.json"], ["vocab.txt"]]`);
        the snapshot must hold every file of one set.
      what: what the files are for, for the error message (e.g. "tokenizer 'clip'").

    Raises:
      ConfigError: no repository of `repo_ids` has the files in the cache and they
        cannot be fetched (offline, no network, unknown or gated repository).
    """
    from huggingface_hub import snapshot_download

    cache, off = cache_dir(), offline()
    reason = "HF_HUB_OFFLINE is set" if off else ""
    for repo in repo_ids:
        try:
            folder = snapshot_download(repo, allow_patterns=list(patterns), cache_dir=cache,
                                       local_files_only=off)
        except (OSError, ValueError) as e:  # not cached, not fetchable, a bad repo id
            if not off:
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        if _has(folder, needed):
            return folder
    repo = repo_ids[0]
    files = " or ".join(" + ".join(s) for s in needed)
    others = f" (nor under {', '.join(repo_ids[1:])})" if len(repo_ids) > 1 else ""
    fetch = (f"python -c \"from huggingface_hub import snapshot_download; "
             f"snapshot_download('{repo}', allow_patterns={list(patterns)}, "
             f"cache_dir='{cache}')\"")
    raise ConfigError(
        f"{what}: the files of Hugging Face repository {repo} ({files}) are not in the hub "
        f"cache {cache}{others} and cannot be downloaded"
        f"{f' ({reason})' if reason else ''}; fetch them where there is network with: "
        f"{fetch} (or set HF_HUB_CACHE / HF_HOME to a cache that holds them).")
