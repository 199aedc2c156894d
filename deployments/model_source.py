"""Where a checkpoint comes from: a local directory or a Hugging Face repo id.

A repo id (`Qwen/Qwen3-VL-8B-Instruct`) resolves through `huggingface_hub`'s
cache as `transformers` would: `HF_HOME` / `HF_HUB_CACHE` pick the cache,
`HF_HUB_OFFLINE=1` forbids the network, `revision` picks a branch, tag or
commit. Weights, config, tokenizer and preprocessor are all read from the one
snapshot directory this returns, so they cannot come from different revisions.
"""

from __future__ import annotations

from pathlib import Path

# What serving reads from a repo; skips duplicate .bin/.pt weights and media.
SNAPSHOT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.jinja", "*.model")


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local directory nor resolvable from the Hugging Face hub/cache."""


def is_repo_id(model: str) -> bool:
    """Whether `model` names a hub repo (`org/name`) rather than a local directory.

    An existing path always wins; a repo id needs its organisation, so a bare
    name or a path with more than one separator stays a (missing) directory.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(model).expanduser().exists() or model.count("/") != 1:
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def hub_cache_dir() -> Path:
    """The hub cache this process reads (from HF_HOME / HF_HUB_CACHE at import)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_repo(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot directory of `repo_id` at `revision`, downloading it unless offline.

    Raises:
        ModelNotFoundError naming the id, the revision and the cache searched.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(SNAPSHOT_PATTERNS)))
    except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError, OSError) as exc:
        at = f" at revision {revision!r}" if revision else ""
        offline = " (HF_HUB_OFFLINE is set, so nothing was downloaded)" if constants.HF_HUB_OFFLINE else ""
        raise ModelNotFoundError(
            f"model: {repo_id!r}{at} is not a local directory and could not be resolved from the "
            f"Hugging Face cache {hub_cache_dir()}{offline}: {type(exc).__name__}: {exc}"
        ) from None
