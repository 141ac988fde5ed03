"""Model folders (Hugging Face `save_pretrained`, diffusers) and sharded checkpoints with an index json."""

from __future__ import annotations

import json
import os
from pathlib import PurePath
from typing import Any

from vqdoctor.errors import CheckpointError

# In the order Hugging Face libraries (transformers, diffusers) prefer them.
KNOWN_WEIGHTS = (
    "model.safetensors", "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
MAX_JSON_BYTES = 50_000_000

LOOKED_FOR = ("looked for model.safetensors, pytorch_model.bin, diffusion_pytorch_model.safetensors "
              "(or their .index.json), or a single *.index.json / " +
              " / ".join(f"*{s}" for s in WEIGHT_SUFFIXES) + " file")


def find_weights(folder: str) -> str:
    """The weights file (or index json) to read in a model folder.

    Raises:
        CheckpointError: no weights, or several candidates and no way to choose.
    """
    for name in KNOWN_WEIGHTS:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise CheckpointError(f"cannot be listed ({e.strerror or e})", path=folder) from None
    files = [n for n in names if os.path.isfile(os.path.join(folder, n))]
    indexes = [n for n in files if n.endswith(".index.json")]
    weights = indexes or [n for n in files if n.endswith(WEIGHT_SUFFIXES)]
    if len(weights) == 1:
        return os.path.join(folder, weights[0])
    if not weights:
        raise CheckpointError("is a folder without model weights", path=folder, hint=LOOKED_FOR)
    shown = ", ".join(weights[:5]) + (", ..." if len(weights) > 5 else "")
    raise CheckpointError(f"is a folder with {len(weights)} weights files ({shown})", path=folder,
                          hint="pass one of the files instead of the folder")


def read_json(path: str) -> Any:
    """Parse a small JSON file (an index or config.json).

    Raises:
        CheckpointError: too large, or not valid JSON.
    """
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise CheckpointError(f"is a JSON file over {MAX_JSON_BYTES // 1_000_000} MB, not a "
                              "checkpoint", path=path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except RecursionError:  # json is recursive: nesting past Python's limit is a crafted file
        raise CheckpointError("is JSON nested too deeply to parse (past Python's recursion limit); "
                              "no index or config nests like that", path=path) from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError("is a text file, not a checkpoint (not valid JSON)",
                              path=path) from None
    except OSError as e:
        raise CheckpointError(f"cannot be read ({e.strerror or e})", path=path) from None


def shard_paths(index_path: str, index: Any) -> list[str]:
    """The shard files an index json (`{"weight_map": {tensor: file}}`) names, in order.

    Raises:
        CheckpointError: not an index, a shard outside the index's folder, or a missing shard.
    """
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError("is JSON, not a checkpoint (no \"weight_map\" of a sharded index)",
                              path=index_path)
    base = os.path.dirname(index_path)
    out = []
    for name in dict.fromkeys(wm.values()):
        # An index is data from the file's author: it must not point elsewhere on the disk.
        if os.path.isabs(name) or ".." in PurePath(name).parts:
            raise CheckpointError(f"names a shard outside its folder: {name}", path=index_path)
        p = os.path.join(base, name)
        if not os.path.exists(p):
            raise CheckpointError(f"names shard {name}, which does not exist", path=index_path)
        out.append(p)
    return out
