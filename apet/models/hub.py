"""Hub ids to local checkpoint directories, downloaded on first use (torch-free).

Every Hugging Face tool downloads a hub id on first use; apet does the same through ``huggingface_hub``
(its cache, resume, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``HF_TOKEN`` for gated models), fetching only the
files an export reads (:data:`EXPORT_PATTERNS`: no pickled ``.bin``/``.pt`` or other frameworks' weights)
and saying how much it is about to fetch before it starts (docs: DESIGN.md §1).
"""

from __future__ import annotations

import logging
from pathlib import Path

from apet.errors import UsageError

log = logging.getLogger(__name__)

# what export reads: weights, configs (model, generation, processor, tokenizer, chat template, shard index),
# the sentencepiece / BPE vocabularies; safetensors only (pickled weights are never loaded: hf_files.py)
EXPORT_PATTERNS = ("*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken")


def _local_dir_fix(repo_id: str, option: str) -> str:
    return (f"download it where you have network (hf download {repo_id} --local-dir DIR) and pass "
            f"{option} DIR, a local checkpoint directory")


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover - the loop always returns


def _from_cache(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(EXPORT_PATTERNS), local_files_only=True))
    except Exception:  # not cached (or incomplete): the caller decides what to say
        return None


def _announce(repo_id: str) -> None:
    """Log the size of what is about to be downloaded (the repo's file listing, filtered), before any byte."""
    import inspect

    from huggingface_hub import snapshot_download

    if "dry_run" not in inspect.signature(snapshot_download).parameters:  # huggingface_hub < 1.0: no listing
        log.warning("downloading %s into the Hugging Face cache (files: %s)", repo_id, ", ".join(EXPORT_PATTERNS))
        return
    plan = snapshot_download(repo_id, allow_patterns=list(EXPORT_PATTERNS), dry_run=True)
    todo = [f for f in plan if f.will_download]
    if not any(f.filename.endswith(".safetensors") for f in plan):
        raise UsageError(f"{repo_id} has no .safetensors weights on the hub",
                         "convert the checkpoint to safetensors and pass its directory; pickled weights are "
                         "never loaded")
    if todo:
        size = sum(f.file_size or 0 for f in todo)
        log.warning("downloading %s: %d files, %s (%d already cached) into the Hugging Face cache",
                    repo_id, len(todo), _human(size), len(plan) - len(todo))


def download_checkpoint(repo_id: str, option: str = "--model") -> Path:
    """The local snapshot of hub id ``repo_id``, downloading the files export needs when missing.

    Offline (``HF_HUB_OFFLINE=1``) or with the hub unreachable, a cached snapshot is used; without one the
    error is one line naming ``option`` (the command-line option or API parameter the id came from).
    """
    from huggingface_hub import constants, snapshot_download
    from tqdm.auto import tqdm

    if constants.HF_HUB_OFFLINE:
        cached = _from_cache(repo_id)
        if cached is None:
            raise UsageError(f"cannot load {repo_id!r}: HF_HUB_OFFLINE is set and it is not in the Hugging Face "
                             "cache", _local_dir_fix(repo_id, option))
        return cached
    try:
        _announce(repo_id)
        # apet's own bar (plain tqdm): quiet_third_party() hides the hub's bars, which also cover model loading
        return Path(snapshot_download(repo_id, allow_patterns=list(EXPORT_PATTERNS), tqdm_class=tqdm))
    except UsageError:
        raise
    except Exception as exc:  # unreachable hub, proxy, interrupted transfer (re-running resumes it), refusal
        refused = _refused(exc)
        if refused is not None:
            raise UsageError(f"cannot download {repo_id!r} from {constants.ENDPOINT}: not found, private or gated "
                             f"({type(refused).__name__})",
                             "check the id; for a gated model accept its licence on the hub and log in (hf auth "
                             f"login or HF_TOKEN); or pass {option} DIR, a local checkpoint directory") from exc
        cached = _from_cache(repo_id)
        if cached is not None:
            log.warning("%s is unreachable (%s): using the cached %s", constants.ENDPOINT, type(exc).__name__,
                        repo_id)
            return cached
        raise UsageError(f"cannot download {repo_id!r} from {constants.ENDPOINT} ({type(exc).__name__}) and it is "
                         "not in the Hugging Face cache", _local_dir_fix(repo_id, option)) from exc


def _refused(exc: BaseException) -> BaseException | None:
    """The hub's "not found / gated" answer in ``exc``'s chain (a dry run wraps it in DryRunError)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    while exc is not None:
        if isinstance(exc, (RepositoryNotFoundError, GatedRepoError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
