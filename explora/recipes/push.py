"""``explora push``: upload an export folder (weights, ``config.json``, ``model.json``, model card) to the Hugging Face
Hub with ``huggingface_hub`` (the optional extra ``hub``), private by default.

The path may be the export itself or a run directory (``explora pretrain``'s ``<run>/export``, ``explora
finetune``'s ``<run>/best``); a missing model card is written first
(:func:`~explora.models.model_card.write_model_card`) so the Hub page documents the model. Not being logged in, an
invalid token, offline mode and an unreachable Hub are :class:`~explora.core.errors.ConfigError` s that say what to
do; the client is a parameter, so tests pass a local fake (no network).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from explora.core.errors import ConfigError
from explora.models.model_card import CARD, write_model_card

EXPORT_DIRS = ("export", "best")  # where a run keeps its export: pre-training, fine-tuning
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SKIP = ("*.tmp", ".*")  # atomic-write temp files and hidden files are never uploaded


def find_export(path: str | os.PathLike[str]) -> Path:
    """The export folder at ``path`` (one holding ``model.json``), or a run directory's ``export``/``best``."""
    p = Path(path)
    if (p / "model.json").is_file():
        return p
    for name in EXPORT_DIRS:
        if (p / name / "model.json").is_file():
            return p / name
    raise ConfigError(f"explora push {p}: no explora export there (expected model.json in {p} or in "
                      f"{' or '.join(str(p / n) for n in EXPORT_DIRS)}); run explora pretrain/finetune/export first")


def hub_api() -> Any:
    """A ``huggingface_hub.HfApi`` (token from ``hf auth login`` or ``HF_TOKEN``); ConfigError when not installed."""
    try:
        from huggingface_hub import HfApi
    except ImportError as err:
        raise ConfigError("explora push needs huggingface_hub: pip install 'explora[hub]'") from err
    return HfApi(library_name="explora")


def _hub_error(err: Exception, repo: str) -> ConfigError:
    """The message a user can act on for a failed Hub call."""
    name = type(err).__name__
    status = getattr(getattr(err, "response", None), "status_code", None)
    if name == "LocalTokenNotFoundError":
        return ConfigError("explora push: not logged in to the Hugging Face Hub; run `hf auth login` (or set "
                           "HF_TOKEN) and push again")
    if status in (401, 403):
        return ConfigError(f"explora push: the Hub refused the token for {repo} (HTTP {status}); log in again with "
                           "`hf auth login` with a token that may write to that namespace")
    if name == "OfflineModeIsEnabled":
        return ConfigError("explora push: huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); unset it to push")
    if isinstance(err, OSError) or any(w in name.lower() for w in ("connect", "timeout", "network", "resolve")):
        return ConfigError(f"explora push: cannot reach the Hugging Face Hub ({name}: {err}); check the network "
                           "(or a proxy) and push again; nothing was uploaded")
    return ConfigError(f"explora push {repo}: the Hub answered {name}: {err}")


def push_export(
    path: str | os.PathLike[str],
    repo: str,
    *,
    private: bool = True,
    revision: str | None = None,
    commit_message: str = "Upload ExPLoRA export",
    eval_dirs: list[str] | tuple[str, ...] = (),
    api: Any | None = None,
) -> str:
    """Upload the export at ``path`` (or a run's) to the Hub repository ``repo`` (``user/name``), created private
    unless ``private=False``; returns the commit URL. With ``eval_dirs`` (evaluation runs' directories) the model
    card is rewritten with their numbers first. ``api`` defaults to :func:`hub_api`."""
    if not _REPO.match(repo or ""):
        raise ConfigError(f"explora push --repo {repo!r}: expected a Hub repository id 'user/name'")
    export = find_export(path)
    if eval_dirs or not (export / CARD).is_file():
        write_model_card(export, eval_dirs=eval_dirs)
    client = api if api is not None else hub_api()
    try:
        client.whoami()
        client.create_repo(repo, private=private, exist_ok=True)
        info = client.upload_folder(repo_id=repo, folder_path=str(export), commit_message=commit_message,
                                    revision=revision, ignore_patterns=list(_SKIP))
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - every client failure becomes one message naming the fix
        raise _hub_error(err, repo) from err
    return str(getattr(info, "commit_url", None) or info)


__all__ = ["EXPORT_DIRS", "find_export", "hub_api", "push_export"]
