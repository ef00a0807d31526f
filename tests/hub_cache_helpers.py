"""A Hugging Face hub cache laid out offline, as `huggingface_hub` lays out what it downloads:
`models--org--name/blobs/<sha256>`, `snapshots/<commit>/<path>` symlinked to the blobs, and
`refs/main` naming the commit (huggingface_hub's own `repo_folder_name` names the folder; its
`scan_cache_dir` must read the result as a valid repository)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def populate_hub_cache(hub_cache: Path, repo_id: str, folder: Path) -> Path:
    """Put every file of `folder` into `hub_cache` as revision main of model `repo_id`; return the snapshot."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.file_download import repo_folder_name

    repo = hub_cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = hashlib.sha1(f"{repo_id}@{folder}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    info = scan_cache_dir(hub_cache)
    repos = {r.repo_id: r for r in info.repos}
    assert repo_id in repos and not info.warnings, info.warnings
    assert {r.commit_hash for r in repos[repo_id].revisions} == {commit}
    return snapshot
