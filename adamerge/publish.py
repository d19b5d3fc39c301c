"""Publish the finished output directory to the Hugging Face Hub (``hub.repo_id=ORG/NAME``).

The upload starts only after the atomic write (``export.save_folded``) has put the complete directory in
place, so a failed upload (offline, no token, no rights, the network) leaves the local output intact and
costs one line (``AdamergeError``, exit 2). It goes through ``huggingface_hub``'s ``HfApi`` (``create_repo``
with ``exist_ok``, ``create_branch`` for ``hub.revision``, ``upload_folder``), which reads the token the
usual way (``HF_TOKEN`` or ``hf auth login``'s cache). The model card in the directory follows the Hub's
convention for merges (``card.model_card`` with ``merge_sources``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adamerge.errors import AdamergeError

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def hub_options(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """``hub.repo_id`` / ``hub.private`` / ``hub.revision``, checked before anything is loaded; None: no upload."""
    hub = config.get("hub") or {}
    repo_id = hub.get("repo_id")
    if repo_id is None:
        return None
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise AdamergeError(f"hub.repo_id={repo_id!r} must be ORG/NAME (letters, digits and ._-)")
    if hub.get("private") not in (None, True, False):
        raise AdamergeError(f"hub.private={hub['private']!r} must be true, false or null (the Hub's default)")
    revision = hub.get("revision")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise AdamergeError(f"hub.revision={revision!r} must be a branch name or null (main)")
    return {"repo_id": repo_id, "private": hub.get("private"), "revision": revision}


def publish(directory: str | Path, repo_id: str, private: bool | None = None, revision: str | None = None) -> str:
    """Upload ``directory`` (every file in it) to model repository ``repo_id``; returns the commit's URL."""
    from huggingface_hub import HfApi, constants

    directory = Path(directory)
    local = f"nothing was uploaded; the output is complete in {str(directory)!r}"
    if constants.HF_HUB_OFFLINE:
        raise AdamergeError(f"hub.repo_id={repo_id}: HF_HUB_OFFLINE is set, so {local}")
    api = HfApi()  # the token as huggingface_hub reads it: HF_TOKEN, or the login cache
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(directory), repo_type="model", revision=revision,
                                   commit_message="adamerge: upload the merged model")
    except Exception as e:  # any failure of the client (HTTP, auth, offline, network) is one line: the output stays
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdamergeError(f"hub.repo_id={repo_id}: upload failed ({first}); {local}") from e
    url = getattr(commit, "commit_url", None) or str(commit)
    log.info("uploaded %s to the Hub: %s", directory, url)
    return url
