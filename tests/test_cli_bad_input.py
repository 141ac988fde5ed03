"""Bad input through the CLI: one clear line naming the file, exit 2, no traceback, nothing on stdout.

Every class of bad input from the inspect issue, through `typer.testing.CliRunner` on the real
app (no seams: the real readers, discovery and metrics run), and a few through a real
`python -m vqdoctor` process. The checkpoints that are bad on purpose start from real library
state dicts (vector-quantize-pytorch, encodec `core_vq`, rosinality, taming) and are then
truncated, poisoned or edited the way real files go wrong.
"""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tests.fixtures.reference_quantizers import Quantize, VectorQuantizer2
from tests.libs import encodec_core_vq
from vqdoctor.cli import app

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library

ROOT = Path(__file__).parents[1]


@dataclasses.dataclass
class TrainConfig:
    """A user's own config class pickled into a checkpoint (a global no weights-only load knows)."""

    lr: float = 1e-3


class Payload:
    """Unpickling this runs code: it writes the marker file it was given."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def cli(*args: str) -> Any:
    result = CliRunner().invoke(app, ["inspect", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def assert_one_error_line(result: Any, path: Path | str, *fragments: str) -> str:
    """Exit 2, nothing on stdout, exactly one stderr line `vqdoctor: error: ...` naming `path`."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("vqdoctor: error: "), line
    assert str(path) in line, line
    assert "Traceback" not in line and "internal error" not in line
    for f in fragments:
        assert f in line, (f, line)
    return line


# --- real checkpoints to break ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lucidrains_state() -> dict[str, torch.Tensor]:
    """A lucidrains `VectorQuantize` (64 codes of dim 8) after a few EMA updates, under `vq.`."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=8, codebook_size=64, decay=0.8, kmeans_init=True)
    for _ in range(3):
        vq(torch.randn(1, 512, 8))
    return {f"vq.{k}": v.clone() for k, v in vq.state_dict().items()}


@pytest.fixture(scope="module")
def good_ckpt(lucidrains_state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good") / "vq.pt"
    torch.save(lucidrains_state, path)
    return path


def test_good_checkpoint_is_fine(good_ckpt: Path) -> None:
    result = cli(str(good_ckpt))
    assert result.exit_code in (0, 1), result.stderr
    assert result.stdout and not result.stderr.startswith("vqdoctor: error")


# --- the file is not there or not a checkpoint ------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.ckpt"
    assert_one_error_line(cli(str(path)), path, "no such file or directory")


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# my run\n")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dac"}))
    assert_one_error_line(cli(str(tmp_path)), tmp_path, "folder without model weights")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    assert_one_error_line(cli(str(path)), path, "empty")


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_zip(good_ckpt: Path, tmp_path: Path, keep: float) -> None:
    data = good_ckpt.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * keep)])  # an interrupted copy or a full disk
    assert_one_error_line(cli(str(path)), path, "truncated or corrupt")


def test_truncated_legacy_torch_file(lucidrains_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    full = tmp_path / "full.pt"
    torch.save(lucidrains_state, full, _use_new_zipfile_serialization=False)
    path = tmp_path / "legacy.pt"
    path.write_bytes(full.read_bytes()[:-100])
    assert_one_error_line(cli(str(path)), path, "truncated")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    assert_one_error_line(cli(str(path)), path, "not a checkpoint")


def test_json_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"codebook_size": 1024, "codebook_dim": 8}))
    assert_one_error_line(cli(str(path)), path, "JSON, not a checkpoint")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "train.log"
    path.write_text("epoch 1 loss 0.3 perplexity 2.1\n" * 20)
    assert_one_error_line(cli(str(path)), path, "text file, not a checkpoint")


# --- pickles: nothing from the file may run -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["zip", "legacy", "plain-pickle"])
def test_pickle_that_would_run_code_never_runs(lucidrains_state: dict[str, torch.Tensor],
                                              tmp_path: Path, how: str) -> None:
    marker = tmp_path / "side-effect"
    path = tmp_path / "model.pt"
    obj = {**lucidrains_state, "extra": Payload(marker)}
    if how == "plain-pickle":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=how == "zip")
    line = assert_one_error_line(cli(str(path)), path)
    assert not marker.exists()
    if how != "plain-pickle":  # torch's legacy unpickler names builtins without their module
        assert ("builtins.exec" if how == "zip" else "exec") in line and "--trust-checkpoint" in line
    else:
        assert "plain Python pickle" in line


def test_pickle_never_runs_in_a_real_process(lucidrains_state: dict[str, torch.Tensor],
                                             tmp_path: Path) -> None:
    marker = tmp_path / "side-effect"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": lucidrains_state, "callbacks": Payload(marker)}, path)
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "vqdoctor", "inspect", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("vqdoctor: error: ") and str(path) in line and "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("extra,name", [
    (argparse.Namespace(lr=1e-3, batch_size=32), "argparse.Namespace"),
    (TrainConfig(), f"{__name__}.TrainConfig"),
])
def test_unknown_globals_are_named_with_the_way_out(lucidrains_state: dict[str, torch.Tensor],
                                                    tmp_path: Path, extra: Any, name: str) -> None:
    path = tmp_path / "last.ckpt"  # Lightning saves hparams like this
    torch.save({"state_dict": lucidrains_state, "hyper_parameters": {"args": extra}}, path)
    assert_one_error_line(cli(str(path)), path, name, "--trust-checkpoint")
    if name == "argparse.Namespace":  # the way out works, and warns
        result = cli(str(path), "--trust-checkpoint")
        assert result.exit_code in (0, 1), result.stderr
        assert result.stderr.startswith("vqdoctor: warning: --trust-checkpoint")
        assert "vector-quantize-pytorch" in result.stdout


# --- readable, but not something vqdoctor can analyse ----------------------------------------------------------


def test_state_dict_without_a_quantizer(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 3, 3))
    path = tmp_path / "autoencoder.pt"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    line = assert_one_error_line(cli(str(path)), path, "no quantizer found among 4 tensors",
                                 "--quantizer PREFIX", "searched for:", "vector-quantize-pytorch")
    assert line.endswith("generic [K, D] codebook with EMA buffers)")  # nothing cut off


def test_named_prefix_that_holds_nothing(good_ckpt: Path) -> None:
    assert_one_error_line(cli(str(good_ckpt), "--quantizer", "decoder.quantize"), good_ckpt,
                          "decoder.quantize")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_codebook_is_a_finding_not_an_error(lucidrains_state: dict[str, torch.Tensor],
                                                      tmp_path: Path, value: float) -> None:
    sd = dict(lucidrains_state)
    sd["vq._codebook.embed"] = torch.full_like(sd["vq._codebook.embed"], value)
    sd["vq._codebook.embed_avg"] = torch.full_like(sd["vq._codebook.embed_avg"], value)
    path = tmp_path / "nonfinite.pt"
    torch.save(sd, path)
    result = cli(str(path), "--format", "json")
    assert result.exit_code == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["findings"][0]["id"] == "non-finite"
    assert data["findings"][0]["evidence"]["nonfinite_rows"] == 64
    (line,) = result.stderr.splitlines()
    assert line.startswith("failing:") and "(diagnosis: non-finite)" in line


def test_nan_gradient_codebook_in_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    quantize = VectorQuantizer2(128, 16)
    quantize.embedding.weight.data[::2] = float("nan")  # an optimizer step that blew half the rows up
    path = tmp_path / "model.safetensors"
    save_file({f"quantize.{k}": v for k, v in quantize.state_dict().items()}, path)
    result = cli(str(path))
    assert result.exit_code == 1 and "non-finite" in result.stdout
    assert result.stderr.splitlines()[-1].endswith("(diagnosis: non-finite)")


# --- EMA statistics that contradict their codebook --------------------------------------------------------------
#
# A count vector of length K + 1 (or sums of another shape) cannot belong to the codebook next to
# it: the file was edited, or tensors of different checkpoints were mixed. Reading it anyway
# would measure nonsense (or, before, crash in the metrics or be misread by the generic adapter
# and called healthy), so it is an input error that names the tensors and their shapes.


def _encodec_state() -> dict[str, torch.Tensor]:
    core_vq = encodec_core_vq()
    torch.manual_seed(0)
    rvq = core_vq.ResidualVectorQuantization(num_quantizers=2, dim=8, codebook_size=64)
    rvq(torch.randn(2, 8, 128))
    return {f"quantizer.vq.{k}": v.clone() for k, v in rvq.state_dict().items()}


def _rosinality_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    q = Quantize(8, 64)
    q(torch.randn(512, 8))
    return {f"quantize_t.{k}": v.clone() for k, v in q.state_dict().items()}


@pytest.mark.parametrize("layout,key,shape", [
    ("lucidrains", "vq._codebook.cluster_size", (1, 65)),
    ("lucidrains", "vq._codebook.embed_avg", (1, 64, 9)),
    ("encodec", "quantizer.vq.layers.1._codebook.cluster_size", (65,)),
    ("rosinality", "quantize_t.cluster_size", (65,)),
])
def test_mismatched_ema_shapes(lucidrains_state: dict[str, torch.Tensor], tmp_path: Path,
                               layout: str, key: str, shape: tuple[int, ...]) -> None:
    sd = {"lucidrains": lambda: dict(lucidrains_state), "encodec": _encodec_state,
          "rosinality": _rosinality_state}[layout]()
    sd[key] = torch.rand(shape)
    path = tmp_path / f"{layout}.pt"
    torch.save(sd, path)
    line = assert_one_error_line(cli(str(path)), path, "EMA statistics do not fit the codebook", key,
                                 "[" + ", ".join(map(str, shape)) + "]")
    assert "expected" in line
    if layout == "encodec":  # the healthy stage can still be inspected on its own
        assert "--quantizer PREFIX" in line
        result = cli(str(path), "--quantizer", "quantizer.vq.layers.0")
        assert result.exit_code in (0, 1), result.stderr
        assert "quantizer.vq.layers.0" in result.stdout and "layers.1" not in result.stdout


# --- probe -------------------------------------------------------------------------------------------------------


def test_probe_of_the_wrong_dim(good_ckpt: Path, tmp_path: Path) -> None:
    probe = tmp_path / "z.pt"
    torch.save(torch.randn(256, 11), probe)
    assert_one_error_line(cli(str(good_ckpt), "--probe", str(probe)), probe, "dim 11", "vq (8)")


@pytest.mark.parametrize("what", ["missing", "text", "fifo"])
def test_unusable_probe_file(good_ckpt: Path, tmp_path: Path, what: str) -> None:
    probe = tmp_path / "z.pt"
    if what == "text":
        probe.write_text("not a tensor\n")
    elif what == "fifo":
        os.mkfifo(probe)
    assert_one_error_line(cli(str(good_ckpt), "--probe", str(probe)), probe)


# --- unreadable ----------------------------------------------------------------------------------------------------


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    os.mkfifo(path)  # opening it would wait for a writer forever
    assert_one_error_line(cli(str(path)), path, "not a regular file")


def _cli_as_nobody(*args: str, warm: tuple[str, ...] = ()) -> Any:
    """`cli(*args)` in a forked child that dropped root for `nobody` (root reads mode-000 files);
    the result comes back through a pipe. `nobody` may not read the interpreter's own files, so
    the child first runs the CLI on `warm` paths as root, importing what the run will need."""
    import types

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(r)
            for path in warm:
                cli(path)
            os.setgid(65534)
            os.setuid(65534)
            res = cli(*args)
            with os.fdopen(w, "wb") as f:
                pickle.dump((res.exit_code, res.stdout, res.stderr), f)
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the unprivileged child failed"
    exit_code, stdout, stderr = pickle.loads(data)
    return types.SimpleNamespace(exit_code=exit_code, stdout=stdout, stderr=stderr)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_permission_denied(good_ckpt: Path) -> None:
    # a folder `nobody` can enter (pytest's own tmp folders are private to their owner), so that
    # the file's own mode is what refuses the read
    folder = Path(tempfile.mkdtemp(prefix="vqdoctor-perm-"))
    folder.chmod(0o755)
    path = folder / "locked.pt"
    path.write_bytes(good_ckpt.read_bytes())
    path.chmod(0)
    try:
        warm = (str(good_ckpt), str(folder / "missing.pt"))
        result = _cli_as_nobody(str(path), warm=warm) if os.geteuid() == 0 else cli(str(path))
        assert_one_error_line(result, path, "permission denied")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_bad_input_in_a_real_process(tmp_path: Path) -> None:
    """The same contract from a real process: stderr is a pipe, not a terminal, 80 columns."""
    path = tmp_path / ("a-long-folder-name-" * 6) / "train.log"
    path.parent.mkdir()
    path.write_text("hello\n")
    proc = subprocess.run([sys.executable, "-m", "vqdoctor", "inspect", str(path)], cwd=ROOT,
                          env={**os.environ, "NO_COLOR": "1", "COLUMNS": "80"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    (line,) = proc.stderr.splitlines()  # longer than 80 columns, still one line
    assert line.startswith("vqdoctor: error: ") and str(path) in line and len(line) > 80
