"""Tell what a path holds from its first bytes, never from its name, without reading the rest."""

from __future__ import annotations

import os
import pickle
import stat
import struct

from vqdoctor.errors import CheckpointError, InputError

# safetensors' own reader refuses larger headers; checking first gives a clear message and keeps
# a hostile length from ever reaching a parser.
MAX_SAFETENSORS_HEADER = 100_000_000

# A legacy torch.save file starts with a pickled magic number (serialization.MAGIC_NUMBER);
# its LONG1 opcode and bytes are the same in every pickle protocol.
_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[2:-1]

_HEAD = 4096

EXPECTED = "expected a torch.save file (zip or legacy), safetensors, a sharded index .json, or a model folder"


def sniff(path: str) -> str:
    """The kind of thing at `path`.

    Args:
        path: a file or folder.

    Returns:
        One of "folder", "torch-zip", "torch-legacy", "safetensors", "json".

    Raises:
        InputError: the path is missing or cannot be read.
        CheckpointError: the file is empty, not a regular file, or not a checkpoint format.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError("no such file or directory", path=path) from None
    except OSError as e:
        raise _unreadable(path, e) from None
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    # Checked before any open(): opening a FIFO blocks until a writer appears, /dev/zero never ends.
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError("is not a regular file (a pipe, device or socket)", path=path,
                              hint=EXPECTED)
    if st.st_size == 0:
        raise CheckpointError("is empty (0 bytes)", path=path)
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
    except OSError as e:
        raise _unreadable(path, e) from None

    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        # Text that happens to have '{' at byte 8 gives an absurd length; a real header length
        # has zero high bytes.
        if n < 1 << 40:
            if n > MAX_SAFETENSORS_HEADER:
                raise CheckpointError(f"safetensors header of {n} bytes exceeds the "
                                      f"{MAX_SAFETENSORS_HEADER // 1_000_000} MB limit", path=path)
            if n + 8 > st.st_size:
                raise CheckpointError(f"is a truncated safetensors file (header claims {n} bytes, "
                                      f"file has {st.st_size})", path=path)
            return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        if _TORCH_MAGIC in head[:32]:
            return "torch-legacy"
        raise CheckpointError("is a plain Python pickle, not a torch.save checkpoint", path=path,
                              hint=EXPECTED)
    if b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as e:
            # A multi-byte character cut at the end of the sample is still text.
            text = head[: e.start].decode("utf-8") if e.start >= len(head) - 3 else None
        if text is not None:
            if text.lstrip()[:1] in ("{", "["):
                return "json"
            raise CheckpointError("is a text file, not a checkpoint", path=path, hint=EXPECTED)
    raise CheckpointError("is not a checkpoint (unrecognised binary format)", path=path,
                          hint=EXPECTED)


def _unreadable(path: str, err: OSError) -> InputError:
    why = "permission denied" if isinstance(err, PermissionError) else (err.strerror or str(err)).lower()
    return InputError(f"cannot be read ({why})", path=path)
