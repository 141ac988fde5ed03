"""Zero-code watching: `vqdoctor watch -- CMD ARGS...` runs an unmodified training command watched.

```python
from vqdoctor.live.launcher import run_watched
run = run_watched(["python", "train.py", "--lr", "3e-4"], "runs/vq")
run.exit_code, run.report.diagnosis      # the command's exit status, the ranked report
```

**The parent** (this process, `run_watched`) creates the run directory, writes `meta.json` with
the command, starts the command with two environment changes, shows the live panel while it
runs (`vqdoctor.cli.panel`; it tails the run directory), forwards SIGINT/SIGTERM to it, then
completes `meta.json` (`exit_code`; status `failed` on a non-zero exit) and computes the report
from the run directory alone. The command's stdin/stdout/stderr are its own (inherited).

- `PYTHONPATH` gets `vqdoctor/live/_boot` in front, so every Python interpreter of the command
  (the script, `python -m pkg.train`, `torchrun` and each of its workers, subprocesses) runs
  vqdoctor's `sitecustomize.py` at start-up (which first runs the `sitecustomize` it shadows);
- `VQDOCTOR_WATCH` holds the configuration as JSON: run directory (absolute), cadences, the
  command, and the folder vqdoctor is installed in.

**In each child interpreter** (`vqdoctor.live.agent.agent_boot`, called by `sitecustomize` right after `torch` has
been imported, never before, so a program that never imports torch is not touched):

1. global `register_module_forward_pre_hook` / `register_module_forward_hook` (always called)
   track the call depth; a module called at depth 0 is a *root*. At the first forward of a root
   that holds quantizers (`vqdoctor.live.discovery.find_quantizers`; DDP / DataParallel /
   `torch.compile` wrappers are looked through) a `Doctor` starts on it, before its forward
   runs, so the first step is recorded. Both global hooks are then removed (they cost a Python
   call per module call while armed). Roots without quantizers (a loss module, an encoder
   called alone) are checked once each and skipped. Only the main process of each program, or
   a process that is a `torch.distributed` rank, attaches (DataLoader workers never do).
2. The step clock is the Doctor's own: optimizer steps, seen through the global optimizer-step
   hooks, end a step.
3. The loss is captured without code changes by wrapping `torch.autograd.backward` (which
   `Tensor.backward` calls): a scalar floating tensor that backward is called on with no
   explicit gradient is copied into the current step's device slot (no synchronisation). With
   several backward calls in one step (gradient accumulation) the last one is recorded; under
   AMP `GradScaler.scale(loss).backward()` the recorded loss is the *scaled* loss.
4. `atexit` closes the Doctor: status `finished`, or `failed` when the program died of an
   uncaught exception (`sys.excepthook` is wrapped; the original is still called).

Under `torchrun` every worker is a rank (`RANK` / `torch.distributed`) and appends its own
`rank{R}.jsonl` to the one run directory passed down in `VQDOCTOR_WATCH`.

Never breaks training: every piece runs in try/except; a failure prints one line
(`vqdoctor: warning: ...; the program runs unwatched`) and the program goes on unwatched.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vqdoctor.errors import InputError
from vqdoctor.live.follow import WatchPanel
from vqdoctor.live.store import (
    META,
    SCHEMA_VERSION,
    now_iso,
    read_meta,
    stream_paths,
    write_json_atomic,
)

if TYPE_CHECKING:
    from vqdoctor.live.alerts import Alert
    from vqdoctor.results.model import Report

ENV_CONFIG = "VQDOCTOR_WATCH"
"""Environment variable carrying the watch configuration (JSON) to the child interpreters."""
BOOT_DIR = Path(__file__).resolve().parent / "_boot"
"""The folder put first on the children's PYTHONPATH (holds vqdoctor's `sitecustomize.py`)."""
DEFAULT_ROOT = "vqdoctor-runs"
NOTHING_RECORDED = ("nothing was recorded: no model holding a quantizer ran a forward pass under "
                    "the watch (a PyTorch program? `python -I`/`-E` ignore PYTHONPATH)")


# ================================================================================ parent side


@dataclass(frozen=True)
class WatchedRun:
    """What `run_watched` returns.

    Attributes:
        exit_code: the command's exit status (128 + N when a signal N killed it).
        run_dir: the run directory.
        report: the ranked report of the recorded run; None when nothing was recorded.
        status: "finished" or "failed" (a non-zero exit is a failure), as in meta.json.
        command: the command that ran.
        note: why there is no report, when there is none.
        alerts: the alerts the live panel raised while the command ran.
    """

    exit_code: int
    run_dir: Path
    report: Report | None
    status: str
    command: tuple[str, ...]
    note: str | None = None
    alerts: tuple[Alert, ...] = ()

    @property
    def recorded(self) -> bool:
        """True when the run directory holds records (a report could be made)."""
        return self.report is not None


def new_run_dir(root: str | os.PathLike[str] = DEFAULT_ROOT) -> Path:
    """A new folder name under `root`: timestamp plus a random suffix (not from torch's RNG)."""
    return Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def holds_run(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a directory with a meta.json or a rank*.jsonl stream."""
    p = Path(path)
    try:
        return p.is_dir() and ((p / META).is_file() or bool(stream_paths(p)))
    except OSError:
        return False


def prepare_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Create the run directory of a new watched command.

    Raises:
        InputError: the path is a file, already holds a run, or cannot be created.
    """
    d = Path(run_dir)
    if d.exists() and not d.is_dir():
        raise InputError("not a directory", path=str(d), hint="--run-dir takes a folder")
    if holds_run(d):
        raise InputError("the run directory already holds a run", path=str(d),
                         hint="give a new --run-dir, or remove the old run")
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".vqdoctor-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write the run directory: {e.strerror or e}", path=str(d)) from None
    return d


def watch_config(run_dir: Path, command: Sequence[str], *, flush_every: int = 50,
                 stats_every: int = 10, window: int | None = None,
                 tensorboard: str | os.PathLike[str] | None = None, wandb: bool = False) -> dict[str, Any]:
    """The configuration handed to the child interpreters (JSON in `VQDOCTOR_WATCH`)."""
    import vqdoctor

    return {"run_dir": str(Path(run_dir).resolve()), "flush_every": int(flush_every),
            "stats_every": int(stats_every), "window": None if window is None else int(window),
            "command": list(command), "path": str(Path(vqdoctor.__file__).resolve().parents[1]),
            "version": vqdoctor.__version__,
            "tensorboard": str(Path(tensorboard).resolve()) if tensorboard else None,
            "wandb": bool(wandb)}


def check_exporters(tensorboard: str | os.PathLike[str] | None, wandb: bool) -> None:
    """Refuse `--tensorboard` / `--wandb` up front when their package is missing here.

    Raises:
        InputError: the package is not installed.
    """
    import importlib.util

    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise InputError("--tensorboard needs the tensorboard package",
                         hint="pip install 'vqdoctor[tensorboard]'")
    if wandb and importlib.util.find_spec("wandb") is None:
        raise InputError("--wandb needs the wandb package", hint="pip install 'vqdoctor[wandb]'")


def watch_env(config: dict[str, Any], base: dict[str, str] | None = None) -> dict[str, str]:
    """The command's environment: `base` (default: ours) with the boot folder first on
    PYTHONPATH and the configuration in `VQDOCTOR_WATCH`."""
    env = dict(os.environ if base is None else base)
    old = env.get("PYTHONPATH")
    parts = [p for p in (old or "").split(os.pathsep) if p and Path(p).resolve() != BOOT_DIR]
    env["PYTHONPATH"] = os.pathsep.join([str(BOOT_DIR), *parts])
    env[ENV_CONFIG] = json.dumps(config)
    return env


def _initial_meta(command: Sequence[str], config: dict[str, Any]) -> dict[str, Any]:
    from vqdoctor import __version__

    return {"schema_version": SCHEMA_VERSION, "tool": {"name": "vqdoctor", "version": __version__},
            "created": now_iso(), "ended": None, "status": "running", "command": list(command),
            "cwd": os.getcwd(), "torch": None, "world_size": None,
            "config": {"flush_every": config["flush_every"], "stats_every": config["stats_every"],
                       "window": config["window"], "hist_every": config["flush_every"],
                       "fsync": False, "start_step": 0},
            "quantizers": [], "steps": None, "launcher": {"pid": os.getpid()}}


def finalize_meta(run_dir: str | os.PathLike[str], exit_code: int) -> str:
    """Complete meta.json after the command ended: `exit_code`, `ended`, and the status
    ("failed" on a non-zero exit, or when the training said so; else "finished").

    Returns:
        The status written (also when meta.json could not be rewritten).
    """
    meta = read_meta(run_dir)
    status = meta.get("status")
    if exit_code != 0:
        status = "failed"
    elif status not in ("finished", "failed"):
        status = "finished"  # the process ended without closing its watch (os._exit)
    meta.update(status=status, exit_code=int(exit_code))
    if not meta.get("ended"):
        meta["ended"] = now_iso()
    try:
        write_json_atomic(Path(run_dir) / META, meta)
    except OSError:
        pass
    return str(status)


def _check_runnable(program: str, env: dict[str, str] | None, cwd: str | os.PathLike[str] | None) -> None:
    """Raise InputError unless `program` names an executable (on PATH, or a path)."""
    import shutil

    if os.sep in program or (os.altsep and os.altsep in program):
        p = Path(cwd or ".") / program
        if not p.exists():
            raise InputError(f"command not found: {program}")
        if p.is_dir() or not os.access(p, os.X_OK):
            raise InputError(f"cannot run {program}: not an executable",
                             hint="run a script with its interpreter: vqdoctor watch -- python SCRIPT")
        return
    path = (env or os.environ).get("PATH")
    if shutil.which(program, path=path) is None:
        raise InputError(f"command not found: {program}")


def _remove_new_run_dir(run_dir: Path, created: bool) -> None:
    """Undo `prepare_run_dir` + meta.json after the command could not start."""
    try:
        (run_dir / META).unlink(missing_ok=True)
        if created:
            run_dir.rmdir()
    except OSError:
        pass


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class _SignalForwarder:
    """SIGINT/SIGTERM (and SIGHUP) sent to us go to the command; we keep waiting for it.

    A Ctrl-C typed at the terminal already reaches the command (same foreground process
    group), so SIGINT is not sent a second time then.
    """

    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._old: dict[int, Any] = {}

    def install(self) -> _SignalForwarder:
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except (OSError, ValueError):
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.proc.poll() is not None:
            return
        if signum == signal.SIGINT and _shares_terminal_group(self.proc.pid):
            return
        try:
            self.proc.send_signal(signum)
        except (OSError, ValueError):
            pass

    def restore(self) -> None:
        for sig, handler in self._old.items():
            try:
                signal.signal(sig, handler)
            except (OSError, ValueError, TypeError):
                pass
        self._old = {}


def _shares_terminal_group(pid: int) -> bool:
    """True when we are the terminal's foreground process group and `pid` is in it."""
    if os.name != "posix":
        return False
    try:
        group = os.getpgrp()
        if os.getpgid(pid) != group:
            return False
        for fd in (0, 1, 2):
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == group
    except OSError:
        return False
    return False


def command_title(command: Sequence[str], limit: int = 60) -> str:
    """The command as a shell would show it, cut to `limit` characters."""
    text = " ".join(shlex.quote(str(c)) for c in command)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_watched(command: Sequence[str], run_dir: str | os.PathLike[str] | None = None, *,
                flush_every: int = 50, stats_every: int = 10, window: int | None = None,
                display: Callable[[WatchPanel, str], Any] | None = None,
                thresholds: dict[str, dict[str, Any]] | None = None,
                env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                poll: float = 0.5, tensorboard: str | os.PathLike[str] | None = None,
                wandb: bool = False) -> WatchedRun:
    """Run an unmodified training command with vqdoctor's hooks attached in its Python processes.

    Args:
        command: the command and its arguments, e.g. ["python", "train.py", "--lr", "3e-4"].
        run_dir: where to record (default: a new folder under ./vqdoctor-runs/). It must not
            hold a run already.
        flush_every: steps between device->host copies (and panel updates).
        stats_every: steps between cadence statistics.
        window: steps of the windowed usage metrics (default: automatic).
        display: makes what shows the run while it trains from its `WatchPanel` and a title
            (the command line's `cli.panel.open_display`); it has `update(final=False)` and
            `close()`. None: nothing is shown, the alerts are still kept.
        thresholds: rule threshold overrides for the alerts and the report.
        env: the command's base environment (default: ours).
        cwd: the command's working directory (default: ours).
        poll: seconds between two reads of the run directory.
        tensorboard: also write TensorBoard event files to this folder (from rank 0).
        wandb: also log to Weights & Biases (the program's active run, else a new one).

    Returns:
        The command's exit status, the run directory and the ranked report.

    Raises:
        InputError: empty command, command not found, or unusable run directory.
    """
    cmd = [str(c) for c in command]
    if not cmd:
        raise InputError("no command to run", hint="vqdoctor watch -- python train.py")
    _check_runnable(cmd[0], env, cwd)  # before anything is created
    check_exporters(tensorboard, wandb)
    target = Path(run_dir if run_dir is not None else new_run_dir())
    created = not target.exists()
    rd = prepare_run_dir(target)
    config = watch_config(rd, cmd, flush_every=flush_every, stats_every=stats_every, window=window,
                          tensorboard=tensorboard, wandb=wandb)
    try:
        write_json_atomic(rd / META, _initial_meta(cmd, config))
        proc = subprocess.Popen(cmd, env=watch_env(config, env), cwd=cwd)
    except OSError as e:
        _remove_new_run_dir(rd, created)
        if isinstance(e, FileNotFoundError):
            raise InputError(f"command not found: {cmd[0]}") from None
        raise InputError(f"cannot run {cmd[0]}: {e.strerror or e}") from None

    forwarder = _SignalForwarder(proc).install()
    wp = WatchPanel(rd, thresholds=thresholds)
    try:
        shown: Any = _Unshown(wp)
        if display is not None:
            try:
                shown = display(wp, command_title(cmd))
            except Exception:  # a panel that cannot start must not stop the training
                pass
        try:
            while True:
                try:
                    returncode = proc.wait(timeout=poll)
                    break
                except subprocess.TimeoutExpired:
                    pass
                try:
                    shown.update()
                except Exception:
                    shown = _Unshown(wp)
            exit_code = _exit_status(returncode)
            status = finalize_meta(rd, exit_code)
            try:
                shown.update(final=True)
            except Exception:
                pass
        finally:
            try:
                shown.close()
            except Exception:
                pass
    finally:
        forwarder.restore()
        if proc.poll() is None:  # we are being torn down: do not leave the training orphaned
            try:
                proc.terminate()
                proc.wait(timeout=10)
            except Exception:
                pass

    report = None
    note = None
    if any(_size(p) for p in stream_paths(rd).values()):
        report = wp.current_report()  # the panel's final diagnosis, when it saw every record
        if report is None:
            from vqdoctor.diagnosis import report_run

            report = report_run(rd, thresholds)
    else:
        note = NOTHING_RECORDED
    return WatchedRun(exit_code=exit_code, run_dir=rd, report=report, status=status,
                      command=tuple(cmd), note=note, alerts=tuple(wp.sorted_alerts()))


class _Unshown:
    """No display: the panel's state (latest values, alerts) is still kept."""

    def __init__(self, panel: WatchPanel):
        self.panel = panel

    def update(self, *, final: bool = False) -> list[Alert]:
        return self.panel.refresh(rules=True if final else None)

    def close(self) -> None:
        pass


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


__all__ = ["BOOT_DIR", "DEFAULT_ROOT", "ENV_CONFIG", "WatchedRun", "command_title",
           "finalize_meta", "holds_run", "new_run_dir", "prepare_run_dir", "run_watched",
           "watch_config", "watch_env"]
