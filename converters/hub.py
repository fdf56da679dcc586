"""Hugging Face hub ids ("org/name") -> a local folder, through huggingface_hub's cache.

`from_pretrained("org/name")` works as in Unsloth and transformers: online, `snapshot_download`
fetches what a checkpoint needs (config and safetensors weights, tokenizer files, a PEFT adapter's
files; never pickles, never every GGUF of a GGUF repository) into the cache, or reuses what is
already there; with `HF_HUB_OFFLINE=1` the cached snapshot of the revision (refs/main by default)
is used without any network access. A GGUF repository is read one file at a time:
`from_pretrained("org/name-GGUF", gguf_file="model-Q4_K_M.gguf")`. The cache location follows
huggingface_hub (`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub).
"""

from __future__ import annotations

import pathlib
import re

from fastlora_jax.errors import CheckpointError

# what a checkpoint or a PEFT adapter needs from a repository
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def resolve_model_path(name: str | pathlib.Path, *, revision: str | None = None,
                       gguf_file: str | None = None) -> pathlib.Path:
    """A local path for `name`: itself when it exists, else the cached snapshot of hub id `name`.

    With `gguf_file`, only that file of the repository is fetched; the returned folder holds it.
    """
    path = pathlib.Path(name)
    if path.exists():
        return path
    name = str(name)
    if not _HUB_ID.match(name):
        raise CheckpointError(f"checkpoint path {str(name)!r} does not exist; pass a folder holding "
                              f"config.json and *.safetensors, a .gguf file, or a Hugging Face "
                              f"hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'")
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"revision {revision!r} of " if revision else ""
    try:
        if gguf_file is not None:  # the snapshot folder, `gguf_file` may name a sub-folder
            file = pathlib.Path(hf_hub_download(name, gguf_file, revision=revision))
            return file.parents[len(pathlib.PurePosixPath(gguf_file).parts) - 1]
        folder = pathlib.Path(snapshot_download(name, revision=revision,
                                                allow_patterns=ALLOW_PATTERNS))
    except RevisionNotFoundError:
        raise CheckpointError(f"hub model {name!r} has no revision {revision!r}; pass an existing "
                              f"branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{name!r} is not a local path and no model of that id exists on "
                              f"the Hugging Face hub (or it is private or gated: log in with "
                              f"`hf auth login`); check the spelling") from None
    except LocalEntryNotFoundError:
        reason = ("HF_HUB_OFFLINE=1 forbids downloading it" if constants.HF_HUB_OFFLINE else
                  "the hub could not be reached")
        raise CheckpointError(f"{where}hub model {name!r}"
                              f"{'' if gguf_file is None else f' (file {gguf_file!r})'} is not in "
                              f"the Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}; "
                              f"download it while online (`hf download {name}`), point "
                              f"HF_HUB_CACHE at the cache that holds it, or pass a local "
                              f"path") from None
    except EntryNotFoundError:  # after its subclass LocalEntryNotFoundError
        raise CheckpointError(f"hub model {name!r} has no file {gguf_file!r}; pass the name of "
                              f"one of its .gguf files") from None
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"fetching hub model {name!r} failed ({err}); retry, or pass a "
                              f"local path") from None
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise CheckpointError(f"hub model {name!r} ({str(folder)!r}) has no config.json or "
                              f"adapter_config.json; if it is a GGUF repository, pass "
                              f"gguf_file='<one of its .gguf files>'")
    return folder
