"""`--push-to-hub REPO_ID`: upload an export folder to the Hugging Face Hub with huggingface_hub
(`HfApi.create_repo` + `HfApi.upload_folder`; "Upload files to the Hub",
https://huggingface.co/docs/huggingface_hub/guides/upload). The token is huggingface_hub's own (HF_TOKEN or
`hf auth login`), the endpoint HF_ENDPOINT's (read when pushing, so a value set after import counts).

Every failure (no token, offline mode, the Hub unreachable, the token refused) becomes one HubPushError
paragraph saying what happened and how to upload the folder later; the folder is never touched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_OFF = ("", "0", "false", "no", "off")


class HubPushError(RuntimeError):
    """The export folder could not be uploaded (it stays complete where it is)."""


def check_repo_id(repo_id: str) -> str | None:
    """None when `repo_id` is a valid Hub model id ("name" or "owner/name"), else why not."""
    if not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id or repo_id.endswith((".", "-")):
        return (
            f"{repo_id!r} is not a Hugging Face Hub repository id: give owner/name (letters, digits, '-', "
            "'_', '.'), e.g. my-user/shakespeare-gpt"
        )
    return None


def push_to_hub(folder: Path | str, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create the model repository `repo_id` (if new) and upload `folder` into it; its URL."""
    folder = Path(folder)
    later = (
        f"The exported folder {folder} is complete and unchanged; upload it later from a machine that "
        f"reaches the Hub with `hf upload {repo_id} {folder} . --repo-type model` (after `hf auth login`)."
    )
    problem = check_repo_id(repo_id)
    if problem:
        raise HubPushError(f"{problem}. {later}")
    from huggingface_hub import HfApi, get_token

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in _OFF:
        raise HubPushError(
            f"could not push to the Hugging Face Hub as {repo_id}: HF_HUB_OFFLINE is set, so huggingface_hub "
            f"makes no network request. {later}"
        )
    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise HubPushError(
            f"could not push to the Hugging Face Hub as {repo_id}: no Hugging Face token (log in with `hf "
            "auth login`, or set HF_TOKEN to a token with write access). " + later
        )
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    where = endpoint or "https://huggingface.co"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=url.repo_id, folder_path=folder, repo_type="model",
            commit_message=f"Upload {folder.name} (llmlab export)",
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - every failure becomes one clear paragraph
        raise HubPushError(
            f"could not push to the Hugging Face Hub as {repo_id}: {_why(err, where)}. {later}"
        ) from None
    return str(url)


def _why(err: Exception, where: str) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    if status in (401, 403):
        return (
            f"the Hub at {where} refused the token (HTTP {status}: {first}); it must be valid and have write "
            "access to the namespace"
        )
    if status is not None:
        return f"the Hub at {where} answered HTTP {status} ({first})"
    kind = type(err).__name__
    if isinstance(err, OSError) or any(w in kind for w in ("Connect", "Timeout", "Network", "Transport")):
        return f"the Hub at {where} is unreachable from here ({kind}: {first})"
    return f"{kind}: {first}"
