"""A model name -> a local Hugging Face-format folder, downloading it if need be.

`resolve_model` accepts

* a local folder: it must hold `config.json`;
* a hub repo id such as `Qwen/Qwen2.5-0.5B-Instruct`: if `weights/<name>`
  already holds the model it is used as is (no network); otherwise it is
  fetched with `huggingface_hub.snapshot_download` into `weights/<name>`.

Only configuration, tokenizer and safetensors files are downloaded
(`ALLOW_PATTERNS`): never pickled `*.bin`/`*.pt` checkpoints, never a
repository's Python code. Without a network (and without the model on disk)
the error is one line that says how to get a model, including the offline
default, `tinylora download smollm2`.

What is not here: reading the files (safetensors.py, tokenizer.py), revisions
other than the default branch, private repositories (a token in the usual
`HF_TOKEN` place still works, as huggingface_hub reads it itself).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import TinyloraError
from .safetensors import INDEX_FILE, SINGLE_FILE

# The files around the weights that a model folder may have; fuse copies them too.
TOKENIZER_AND_GENERATION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "chat_template.jinja", "generation_config.json")
ALLOW_PATTERNS = ["config.json", *TOKENIZER_AND_GENERATION_FILES, "*.safetensors", INDEX_FILE]

# "org/name": the shape of a hub repo id (letters, digits, '-', '_', '.'; no '..').
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

HOW_TO_GET_A_MODEL = ("pass a local Hugging Face-format folder, download the model with internet access, "
                      "or get the offline default with `tinylora download smollm2`")


def is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name


def resolve_model(name_or_path: str | os.PathLike, weights_dir: str | os.PathLike = "weights") -> Path:
    """A local folder or a hub repo id -> a local folder holding config.json."""
    path = Path(name_or_path)
    if path.exists():
        return _checked_folder(path)
    name = str(name_or_path)
    # "weights/SmolLM2-135M-Instruct" is shaped like a repo id too; when its
    # first part is a local folder, it was meant as a path.
    if not is_repo_id(name) or path.parent.is_dir():
        raise TinyloraError(f"{name}: no such model folder (and not a Hugging Face repo id, org/name); "
                            + HOW_TO_GET_A_MODEL)

    local = Path(weights_dir) / name.split("/")[1]
    if _looks_complete(local):
        return local
    return _download(name, local)


def _checked_folder(path: Path) -> Path:
    if not path.is_dir():
        raise TinyloraError(f"{path}: is a file, expected a model folder (config.json, *.safetensors, tokenizer)")
    if not (path / "config.json").is_file():
        raise TinyloraError(f"{path}: no config.json in this folder, so it is not a Hugging Face-format model")
    return path


def _looks_complete(folder: Path) -> bool:
    """config.json, tokenizer.json and every weight file: anything less is an interrupted download.

    A sharded checkpoint is complete only when every shard its index names is
    there; otherwise snapshot_download runs again and fetches what is missing.
    """
    if not ((folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()):
        return False
    if (folder / SINGLE_FILE).is_file():
        return True
    try:
        shards = set(json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return all((folder / shard).is_file() for shard in shards)


def _download(repo_id: str, local: Path) -> Path:
    # Imported here: only a download needs it, and a failed import should read as one line too.
    try:
        import huggingface_hub
        # (from .utils, not .errors: .utils has exported these since huggingface_hub 0.2x)
        from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, HFValidationError,
                                           LocalEntryNotFoundError, RepositoryNotFoundError)
    except ImportError:
        raise TinyloraError(f"{repo_id}: downloading needs the huggingface_hub package; "
                            + HOW_TO_GET_A_MODEL) from None

    try:
        huggingface_hub.snapshot_download(repo_id, local_dir=local, allow_patterns=ALLOW_PATTERNS)
    except LocalEntryNotFoundError:          # what snapshot_download raises when it cannot connect
        raise TinyloraError(f"{repo_id}: cannot reach the Hugging Face Hub (offline?) and the model is "
                            f"not in {local}; " + HOW_TO_GET_A_MODEL) from None
    except GatedRepoError:                   # (a subclass of RepositoryNotFoundError: test it first)
        raise TinyloraError(f"{repo_id}: this repository is gated: accept its licence on huggingface.co "
                            "and log in with `hf auth login`, or " + HOW_TO_GET_A_MODEL) from None
    except (RepositoryNotFoundError, HFValidationError):
        raise TinyloraError(f"{repo_id}: no such model on the Hugging Face Hub; " + HOW_TO_GET_A_MODEL) from None
    except HfHubHTTPError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TinyloraError(f"{repo_id}: download failed ({reason}); " + HOW_TO_GET_A_MODEL) from None
    except OSError as e:                     # a full disk, a folder we may not write to
        raise TinyloraError(f"{repo_id}: download into {local} failed: {e}") from None

    if not (local / "config.json").is_file():
        raise TinyloraError(f"{repo_id}: downloaded to {local}, but the repository has no config.json; "
                            "is it a transformers model?")
    if not _looks_complete(local):
        raise TinyloraError(f"{repo_id}: downloaded to {local}, but the repository has no safetensors "
                            "weights (pickle checkpoints are never downloaded)")
    return local
