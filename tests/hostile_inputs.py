"""Hostile but small inputs for `vqdoctor inspect`, built the way an attacker or a broken tool would.

Shared by `tests/test_cli_hostile.py` (each class: one line, exit 2, bounded memory) and
`benchmarks/hostile_inputs.py` (wall time and peak RSS of each, in a fresh process). Every
builder writes its files into a folder and returns the `inspect` arguments that read them.

The constructions:
- stride tricks: expanded (stride-0) and overlapping views of a few stored bytes, written with
  torch's own tensor-rebuild function and any size / stride / storage offset (`raw_tensor`);
- archives that expand: a `.npz` member and a torch zip member deflated from gigabytes of
  zeros (`deflate_bomb`: repeated full-flush blocks, so building one costs a few MB and ~1 s);
- headers that lie: `.npy` and legacy torch files declaring far more data than they hold;
- nesting: pickles nested 100 000 deep, a memo-shared dict DAG with 2^40 paths, a sharded
  index JSON nested past Python's recursion limit;
- odd codebooks: K = 0, D = 0, 1-D and 4-D tables, integer / bool / complex dtypes, meta tensors;
- odd probes: 0-dim, empty, meta, complex;
- malicious pickles: STACK_GLOBAL / numpy-global payloads, a quantized tensor with a huge
  stride, a TorchScript archive.
"""

from __future__ import annotations

import builtins
import collections
import io
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

MiB = 1 << 20


def lucidrains_state(dim: int = 8, codebook_size: int = 64) -> dict[str, torch.Tensor]:
    """A real vector-quantize-pytorch `VectorQuantize` state dict (a few EMA updates), under `vq.`."""
    import vector_quantize_pytorch as vqp

    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=dim, codebook_size=codebook_size, decay=0.8, kmeans_init=True)
    for _ in range(3):
        vq(torch.randn(1, 512, dim))
    return {f"vq.{k}": v.clone() for k, v in vq.state_dict().items()}


# --- tensors with any geometry ---------------------------------------------------------------------------


class RawTensor:
    """Pickles as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride)` with the given
    geometry, so a file can hold what no `torch.Tensor` method would produce (strides past the
    storage, storage offsets past its end). `quantized=(scale, zero_point)` rebuilds a qint8
    tensor with `_rebuild_qtensor` instead."""

    def __init__(self, storage: torch.UntypedStorage, offset: int, size: tuple[int, ...],
                 stride: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 quantized: tuple[float, int] | None = None):
        self.args = (storage, offset, size, stride)
        self.dtype = dtype
        self.quantized = quantized

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        storage, offset, size, stride = self.args
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=self.dtype, _internal=True)
        hooks: collections.OrderedDict = collections.OrderedDict()
        if self.quantized is None:
            return (torch._utils._rebuild_tensor_v2, (typed, offset, size, stride, False, hooks))
        qparams = (torch.per_tensor_affine, *self.quantized)
        return (torch._utils._rebuild_qtensor, (typed, offset, size, stride, qparams, False, hooks))


def raw_tensor(n_stored: int, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0,
               dtype: torch.dtype = torch.float32, **kw: Any) -> RawTensor:
    """A `RawTensor` over a fresh storage of `n_stored` elements of `dtype` (random values)."""
    if dtype.is_floating_point:
        base = torch.randn(n_stored).to(dtype)
    else:  # quantized storages hold their integer representation
        base = torch.zeros(n_stored, dtype=torch.int8 if dtype == torch.qint8 else dtype)
    return RawTensor(base.untyped_storage(), offset, size, stride, dtype, **kw)


# --- archives that expand ------------------------------------------------------------------------------------


def deflate_bomb(prefix: bytes, zeros: int) -> tuple[bytes, int, int]:
    """A raw deflate stream of `prefix` followed by `zeros` zero bytes, built without compressing them.

    After a full flush deflate starts afresh, so the block that encodes one MiB of zeros is the
    same every time and can be repeated. Returns (stream, uncompressed size, crc32).
    """
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(MiB)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    assert block == again, "deflate blocks differ; cannot repeat them"
    n, rest = divmod(zeros, MiB)
    tail = (c.compress(bytes(rest)) if rest else b"") + c.flush()
    crc = zlib.crc32(prefix)
    for _ in range(n):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(bytes(rest), crc)
    return head + block * (n + 1) + tail, len(prefix) + zeros, crc


def write_zip(path: Path, members: list[tuple[str, bytes, bool, int, int]]) -> None:
    """A zip archive written by hand: (name, data, deflated, uncompressed size, crc32) per member.

    Deflated members carry an already compressed stream (so their declared size may be huge).
    """
    out, central = io.BytesIO(), io.BytesIO()
    for name, data, deflated, size, crc in members:
        offset = out.tell()
        method = 8 if deflated else 0
        fname = name.encode()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data),
                              size, len(fname), 0) + fname + data)
        central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc,
                                  len(data), size, len(fname), 0, 0, 0, 0, 0, offset) + fname)
    cd = central.getvalue()
    out.write(cd + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(cd),
                               out.tell(), 0))
    path.write_bytes(out.getvalue())


def _stored(name: str, data: bytes) -> tuple[str, bytes, bool, int, int]:
    return (name, data, False, len(data), zlib.crc32(data))


def torch_zip(path: Path, pickle_bytes: bytes, *, deflated_padding: int = 0) -> None:
    """A torch zip checkpoint whose `data.pkl` is `pickle_bytes` (no tensor storages).

    With `deflated_padding`, `data.pkl` is deflated and followed by that many zero bytes after
    the pickle's STOP (which the unpickler never reaches): a small file that expands on reading.
    """
    if deflated_padding:
        stream, size, crc = deflate_bomb(pickle_bytes, deflated_padding)
        pkl = ("archive/data.pkl", stream, True, size, crc)
    else:
        pkl = _stored("archive/data.pkl", pickle_bytes)
    write_zip(path, [pkl, _stored("archive/byteorder", b"little"), _stored("archive/version", b"3\n")])


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """The header of a `.npy` file declaring `shape` and `dtype` (no data)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


# --- pickles written opcode by opcode ---------------------------------------------------------------------------


def _u(text: str) -> bytes:
    """BINUNICODE (the string opcode torch's weights-only unpickler reads)."""
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def nested_dicts_pickle(depth: int) -> bytes:
    """`{'a': {'a': ... {} ...}}` nested `depth` deep (torch.save itself would hit the recursion limit)."""
    key = _u("a")
    return b"\x80\x02" + (b"}" + key) * depth + b"}" + b"s" * depth + b"."


def nested_lists_pickle(depth: int) -> bytes:
    """`{'a': [[[...]]]}` with lists nested `depth` deep."""
    return b"\x80\x02}" + _u("a") + b"]" * depth + b"a" * (depth - 1) + b"s."


def dag_dict(levels: int, leaf: Any) -> dict:
    """d_0 = {'w': leaf}; d_{i+1} = {'a': d_i, 'b': d_i}: pickled with a memo, 2^levels paths to `leaf`."""
    d: dict = {"w": leaf}
    for _ in range(levels):
        d = {"a": d, "b": d}
    return d


class Payload:
    """Unpickling this runs code: it writes the marker file it was given."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def stack_global_pickle(module: str, name: str, arg: str) -> bytes:
    """Protocol-4 pickle calling `module.name(arg)` through STACK_GLOBAL (no GLOBAL opcode to grep)."""
    return b"\x80\x04" + _u(module) + _u(name) + b"\x93" + _u(arg) + b"\x85R."


def numpy_payload_pickle(marker: Path) -> bytes:
    """A pickle that smuggles code through numpy: `numpy.load(file, allow_pickle=True)` on a
    second pickle that writes `marker`, and an object array whose `_reconstruct` subtype is exec."""
    inner = marker.with_suffix(".inner.pkl")
    inner.write_bytes(pickle.dumps(Payload(marker)))
    # numpy.load(inner, None, True): allow_pickle is the third positional argument
    load = b"cnumpy\nload\n" + _u(str(inner)) + b"N\x88\x87R"
    # numpy.core.multiarray._reconstruct(builtins.exec, (0,), b'b'): the subtype is a payload
    recon = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cbuiltins\nexec\n" + b"K\x00\x85"
             + b"U\x01b" + b"\x87R")
    return b"\x80\x02}(" + _u("b") + recon + _u("a") + load + b"u."


# --- the cases ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One hostile input: how to build it and what the one error line must say.

    Attributes:
        name: short id (also the benchmark row).
        what: the class, as the README table words it.
        build: writes the files into a folder, returns the `inspect` arguments.
        expect: fragments the error line must contain.
        heavy: declares or expands to gigabytes (the class the memory bound is about).
        analysed: the input is still analysed (exit 0 or 1) instead of refused: a broken
            config.json must not hide the weights beside it.
    """

    name: str
    what: str
    build: Callable[[Path, dict[str, torch.Tensor]], list[str]]
    expect: tuple[str, ...]
    heavy: bool = False
    analysed: bool = False


def _ckpt(d: Path, obj: Any, name: str = "model.pt", **kw: Any) -> list[str]:
    path = d / name
    torch.save(obj, path, **kw)
    return [str(path)]


def _with(sd: dict[str, torch.Tensor], **repl: Any) -> dict[str, Any]:
    out: dict[str, Any] = dict(sd)
    for k, v in repl.items():
        out[f"vq._codebook.{k}"] = v
    return out


def _expanded(sd: dict[str, torch.Tensor], k: int, d: int) -> dict[str, Any]:
    return _with(sd, embed=torch.zeros(1, 1, 1).expand(1, k, d),
                 embed_avg=torch.zeros(1, 1, 1).expand(1, k, d),
                 cluster_size=torch.ones(1, 1).expand(1, k))


def _probe(d: Path, sd: dict[str, torch.Tensor], z: Any, name: str = "z.pt") -> list[str]:
    (ckpt,) = _ckpt(d, sd)
    path = d / name
    if name.endswith(".npy"):
        path.write_bytes(z)
    else:
        torch.save(z, path)
    return [ckpt, "--probe", str(path)]


def _npz_bomb(d: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    (ckpt,) = _ckpt(d, sd)
    n = 300_000_000  # 2.4 GB of float64 once inflated
    header = npy_header((n // 8, 8), "<f8")
    stream, size, crc = deflate_bomb(header, n * 8)
    path = d / "z.npz"
    write_zip(path, [("z.npy", stream, True, size, crc)])
    return [ckpt, "--probe", str(path)]


def _npy_lying(d: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    return _probe(d, sd, npy_header((1_000_000_000, 8)) + bytes(32), "z.npy")


def _legacy_lying(d: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    """A legacy (non-zip) torch file whose pickle declares an 8 GB storage for a 64 x 8 table."""
    marker = 1_000_003
    buf = io.BytesIO()
    # the slice keeps the whole storage: its element count appears once, in the storage's record
    torch.save({**sd, "vq.extra": torch.randn(marker)[:8]}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    old, new = b"J" + struct.pack("<i", marker), b"J" + struct.pack("<i", 2_000_000_000)
    assert data.count(old) == 1
    path = d / "legacy.pt"
    path.write_bytes(data.replace(old, new))
    return [str(path)]


def _zip_bomb_pickle(d: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    path = d / "model.pt"
    torch_zip(path, pickle.dumps({"epoch": 3}, protocol=2), deflated_padding=2_400_000_000)
    return [str(path)]


def _deep_pickle(d: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    path = d / "model.pt"
    torch_zip(path, nested_dicts_pickle(100_000))
    return [str(path)]


def _deep_list_pickle(d: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    path = d / "model.pt"
    torch_zip(path, nested_lists_pickle(100_000))
    return [str(path)]


def _dag(d: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    return _ckpt(d, {"model": dag_dict(40, sd["vq._codebook.embed"])})


def _deep_index(d: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    path = d / "model.safetensors.index.json"
    depth = 100_000
    path.write_text('{"weight_map": ' + "[" * depth + "]" * depth + "}")
    return [str(path)]


def _deep_config(d: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    from safetensors.torch import save_file

    folder = d / "model"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    depth = 100_000
    (folder / "config.json").write_text('{"a": ' + "[" * depth + "]" * depth + "}")
    return [str(folder)]


def _safetensors(d: Path, sd: dict[str, Any], name: str = "model.safetensors") -> list[str]:
    from safetensors.torch import save_file

    path = d / name
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return [str(path)]


def _lying_safetensors(d: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    """A safetensors header declaring a 65536 x 4096 float32 table over 4 bytes of data."""
    import json

    header = json.dumps({"vq._codebook.embed": {"dtype": "F32", "shape": [1, 65536, 4096],
                                                "data_offsets": [0, 4]}}).encode()
    path = d / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    return [str(path)]


def _meta(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    return _with(sd, embed=torch.empty(1, 64, 8, device="meta"))


def _torchscript(d: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    path = d / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(8, 8)), str(path))
    return [str(path)]


def _stack_global(d: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    path = d / "model.pt"
    marker = d / "side-effect"
    torch_zip(path, stack_global_pickle("os", "system", f"touch {marker}"))
    return [str(path)]


def _numpy_payload(d: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    path = d / "model.pt"
    torch_zip(path, numpy_payload_pickle(d / "side-effect"))
    return [str(path)]


def _quantized_stride(d: Path, sd: dict[str, torch.Tensor]) -> list[str]:
    q = raw_tensor(16, (4, 4), (1 << 40, 1), dtype=torch.qint8, quantized=(0.1, 0))
    return _ckpt(d, {**sd, "vq.extra": q})


def _strided(d: Path, sd: dict[str, torch.Tensor], size: tuple[int, ...], stride: tuple[int, ...],
             offset: int = 0, n: int = 16) -> list[str]:
    t = raw_tensor(n, size, stride, offset)
    return _ckpt(d, {**sd, "vq._codebook.embed": t,
                     "vq._codebook.embed_avg": raw_tensor(n, size, stride, offset),
                     "vq._codebook.cluster_size": raw_tensor(n, size[:2], stride[:2], offset)})


CASES: tuple[Case, ...] = (
    # memory and time
    Case("expanded-codebook", "codebook that is an expanded (stride-0) view, 65536 x 4096 from 4 bytes",
         lambda d, sd: _ckpt(d, _expanded(sd, 65536, 4096)), ("vq._codebook.", "stride-0", "--max-memory"), True),
    Case("expanded-codebook-40GB", "expanded codebook 1e6 x 1e4 (40 GB as float32)",
         lambda d, sd: _ckpt(d, _expanded(sd, 1_000_000, 10_000)), ("vq._codebook.", "--max-memory"), True),
    Case("overlapping-codebook", "overlapping strides (as_strided): 65536 x 4096 over 272 KiB",
         lambda d, sd: _strided(d, sd, (1, 65536, 4096), (0, 1, 1), n=65536 + 4095),
         ("vq._codebook.", "overlapping", "--max-memory"), True),
    Case("offset-past-end", "storage offset past the end of the stored data",
         lambda d, sd: _strided(d, sd, (1, 64, 8), (512, 8, 1), offset=1 << 20), ("storage",)),
    Case("expanded-probe", "probe that is an expanded (stride-0) view, 1e8 x 8",
         lambda d, sd: _probe(d, sd, torch.zeros(1, 8).expand(100_000_000, 8)), ("z.pt", "stride-0", "--max-memory"), True),
    Case("npz-bomb", "probe .npz member deflated from 2.4 GB of zeros",
         _npz_bomb, ("z.npz", "--max-memory"), True),
    Case("npy-lying-header", "probe .npy declaring 1e9 x 8 float32 over 32 bytes",
         _npy_lying, ("z.npy", "declares")),
    Case("legacy-lying-storage", "legacy torch file declaring an 8 GB storage",
         _legacy_lying, ("legacy.pt",)),
    Case("zip-bomb-checkpoint", "torch zip whose data.pkl inflates to 2.4 GB",
         _zip_bomb_pickle, ("model.pt", "--max-memory"), True),
    Case("lying-safetensors-header", "safetensors header declaring 65536 x 4096 over 4 bytes",
         _lying_safetensors, ("model.safetensors", "header")),
    # nesting
    Case("deep-pickle", "dicts nested 100 000 deep", _deep_pickle, ("model.pt", "nested")),
    Case("deep-list-pickle", "lists nested 100 000 deep under a key", _deep_list_pickle, ("model.pt",)),
    Case("dag-pickle", "memo-shared dict DAG with 2^40 paths", _dag, ("model.pt", "entries")),
    Case("deep-index-json", "sharded index JSON nested 100 000 deep", _deep_index, ("index.json", "nested")),
    Case("deep-config-json", "model folder whose config.json is nested 100 000 deep (ignored)",
         _deep_config, (), analysed=True),
    # odd codebooks
    Case("k0-zip", "K = 0 codebook (torch zip)", lambda d, sd: _ckpt(d, _with(
        sd, embed=torch.zeros(1, 0, 8), embed_avg=torch.zeros(1, 0, 8), cluster_size=torch.zeros(1, 0))),
        ("vq._codebook.embed", "empty")),
    Case("d0-zip", "D = 0 codebook (torch zip)", lambda d, sd: _ckpt(d, _with(
        sd, embed=torch.zeros(1, 64, 0), embed_avg=torch.zeros(1, 64, 0))), ("vq._codebook.embed", "empty")),
    Case("k0-safetensors", "K = 0 codebook (safetensors)", lambda d, sd: _safetensors(d, _with(
        sd, embed=torch.zeros(1, 0, 8), embed_avg=torch.zeros(1, 0, 8), cluster_size=torch.zeros(1, 0))),
        ("vq._codebook.embed", "empty")),
    Case("d0-safetensors", "D = 0 codebook (safetensors)", lambda d, sd: _safetensors(d, _with(
        sd, embed=torch.zeros(1, 64, 0), embed_avg=torch.zeros(1, 64, 0))), ("vq._codebook.embed", "empty")),
    Case("meta-codebook", "codebook on the meta device (no data stored)",
         lambda d, sd: _ckpt(d, _meta(sd)), ("vq._codebook.embed", "meta")),
    Case("int-codebook", "integer codebook", lambda d, sd: _ckpt(d, _with(
        sd, embed=torch.randint(0, 9, (1, 64, 8)), embed_avg=torch.randint(0, 9, (1, 64, 8)))),
        ("vq._codebook.embed", "int64")),
    Case("bool-codebook", "bool codebook", lambda d, sd: _ckpt(d, _with(
        sd, embed=torch.ones(1, 64, 8, dtype=torch.bool))), ("vq._codebook.embed", "bool")),
    Case("complex-codebook", "complex codebook", lambda d, sd: _ckpt(d, _with(
        sd, embed=torch.randn(1, 64, 8, dtype=torch.complex64),
        embed_avg=torch.randn(1, 64, 8, dtype=torch.complex64))), ("vq._codebook.embed", "complex64")),
    Case("1d-codebook", "1-D codebook", lambda d, sd: _ckpt(d, _with(
        sd, embed=torch.randn(64), embed_avg=torch.randn(64), cluster_size=torch.ones(64))),
        ("no quantizer found",)),
    Case("4d-codebook", "4-D codebook", lambda d, sd: _ckpt(d, _with(
        sd, embed=torch.randn(1, 2, 64, 8), embed_avg=torch.randn(1, 2, 64, 8))), ("no quantizer found",)),
    # odd probes
    Case("0dim-probe", "zero-dim probe", lambda d, sd: _probe(d, sd, torch.tensor(1.0)), ("z.pt", "0-dim")),
    Case("empty-probe", "empty probe [0, 8]", lambda d, sd: _probe(d, sd, torch.zeros(0, 8)), ("z.pt", "empty")),
    Case("meta-probe", "probe on the meta device", lambda d, sd: _probe(d, sd, torch.empty(256, 8, device="meta")),
         ("z.pt", "meta")),
    Case("complex-probe", "complex probe", lambda d, sd: _probe(d, sd, torch.randn(256, 8, dtype=torch.complex64)),
         ("z.pt", "complex")),
    Case("expanded-probe-dict", "probe dict entry that is a stride-0 view",
         lambda d, sd: _probe(d, sd, {"vq": torch.zeros(1, 8).expand(100_000_000, 8)}), ("z.pt", "stride-0"), True),
    # malicious
    Case("stack-global", "STACK_GLOBAL pickle calling os.system", _stack_global, ("model.pt", "os.system")),
    Case("numpy-payload", "numpy.load(allow_pickle=True) and _reconstruct(exec) smuggled in",
         _numpy_payload, ("model.pt", "numpy.load", "builtins.exec")),
    Case("quantized-huge-stride", "quantized tensor with a 2^40 stride", _quantized_stride, ("model.pt",)),
    Case("torchscript", "TorchScript archive", _torchscript, ("model.pt", "TorchScript")),
)


def build_all(folder: Path, names: list[str] | None = None) -> dict[str, list[str]]:
    """Build every case (or those named) under `folder/<name>/`; name -> inspect arguments."""
    sd = lucidrains_state()
    out = {}
    for case in CASES:
        if names and case.name not in names:
            continue
        d = folder / case.name
        d.mkdir(parents=True, exist_ok=True)
        out[case.name] = case.build(d, sd)
    return out


def side_effects(folder: Path) -> list[str]:
    """Marker files a payload would have written under `folder` (must stay empty)."""
    return [str(p) for p in folder.rglob("side-effect*") if not p.name.endswith(".inner.pkl")]


__all__ = ["CASES", "Case", "build_all", "lucidrains_state", "side_effects"]
