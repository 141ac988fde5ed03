"""The agent inside each watched interpreter (`vqdoctor watch`'s child side).

`sitecustomize` (`vqdoctor/live/_boot`) calls `agent_boot` right after `torch` has been imported;
the agent arms global forward hooks, attaches a `Doctor` at the first forward of a root that holds
quantizers (by class or by behaviour), wraps `torch.autograd.backward` for the loss and the step
clock, and closes the Doctor at exit. The parent side, the process the user started, is
`vqdoctor.live.launcher` (its docstring tells the whole protocol).

Never breaks training: every piece runs in try/except; a failure prints one line
(`vqdoctor: warning: ...; the program runs unwatched`) and the program goes on unwatched.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import weakref
from typing import Any

_AGENT: _Agent | None = None


def _say(message: str) -> None:
    """One line on stderr from a watched program (no rich: the child stays light)."""
    try:
        sys.stderr.write(f"vqdoctor: {message}\n")
        sys.stderr.flush()
    except Exception:
        pass


def _compiling() -> bool:
    try:
        return bool(_IS_COMPILING[0]())
    except Exception:
        return False


def _not_compiling() -> bool:
    return False


# torch.compiler.is_compiling, once torch is loaded (looked up once: the global hooks call it
# for every module call while they are armed)
_IS_COMPILING: list[Any] = [_not_compiling]


def agent_boot(config: dict[str, Any]) -> None:
    """Arm the watch in this interpreter (called by `_boot/sitecustomize.py` once torch is loaded).

    Idempotent; never raises (a failure prints one warning line and leaves the program unwatched).
    """
    global _AGENT
    if _AGENT is not None:
        return
    try:
        agent = _Agent(config)
        agent.arm()
        _AGENT = agent
    except Exception as e:
        _say(f"warning: could not arm the watch ({type(e).__name__}: {e}); the program runs unwatched")


class _Agent:
    """The watch inside one child interpreter: finds the root model, runs its Doctor."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.boot_pid = os.getpid()
        self.attach_pid: int | None = None
        self.depth = 0
        self.doctor: Any = None
        self.done = False
        self.failed = False
        self.loss_off = False
        self.checked: weakref.WeakSet = weakref.WeakSet()
        # storage of each parameterised root's latest output: a quantizer the loop calls on its
        # own finds its encoder among them (`_upstream`)
        self.outputs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.handles: list[Any] = []
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ arming

    def arm(self) -> None:
        import torch
        from torch.nn.modules.module import (
            register_module_forward_hook,
            register_module_forward_pre_hook,
        )

        compiler = getattr(torch, "compiler", None)
        if compiler is not None and hasattr(compiler, "is_compiling"):
            _IS_COMPILING[0] = compiler.is_compiling
        self.handles.append(register_module_forward_pre_hook(self._pre))
        try:
            self.handles.append(register_module_forward_hook(self._post, always_call=True))
        except TypeError:  # torch < 2.1: no always_call (depth may drift after an exception)
            self.handles.append(register_module_forward_hook(self._post))
        original = torch.autograd.backward
        if not getattr(original, "_vqdoctor_wrapped", False):
            agent = self

            @functools.wraps(original)
            def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
                if agent.doctor is not None:
                    try:
                        if os.getpid() == agent.attach_pid:
                            agent.doctor.saw_backward()
                    except Exception:
                        pass
                    if not agent.loss_off:
                        agent._loss(tensors, args, kwargs)
                return original(tensors, *args, **kwargs)

            backward._vqdoctor_wrapped = True  # type: ignore[attr-defined]
            torch.autograd.backward = backward
        atexit.register(self._at_exit)
        previous = sys.excepthook

        def excepthook(tp: Any, value: Any, tb: Any) -> Any:
            self.failed = True
            return previous(tp, value, tb)

        sys.excepthook = excepthook

    def _warn(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        _say(f"warning: {message}")

    def _disarm(self) -> None:
        self.done = True
        for h in self.handles:
            try:
                h.remove()
            except Exception:
                pass
        self.handles = []

    # ------------------------------------------------------------------ global module hooks

    def _pre(self, module: Any, args: Any) -> None:
        if self.done:
            return None
        try:
            if _compiling():
                return None
            depth = self.depth
            self.depth = depth + 1
            if depth == 0:
                self._consider(module, args)
        except Exception as e:
            self._disarm()
            self._warn("attach", f"could not attach the watch ({type(e).__name__}: {e}); "
                                 f"the program runs unwatched")
        return None

    def _post(self, module: Any, args: Any, output: Any) -> None:
        if self.done:
            return None
        try:
            if not _compiling():
                self.depth = max(0, self.depth - 1)
                if self.depth == 0 and module in self.checked and next(module.parameters(), None) is not None:
                    self.outputs[module] = _storages(output)
        except Exception:
            pass
        return None

    def _upstream(self, args: Any) -> list[Any]:
        """Roots seen earlier whose latest output is (a view or a detached copy of) an input."""
        mine = _storages(args)
        return [m for m, out in list(self.outputs.items()) if out & mine] if mine else []

    def _eligible(self) -> bool:
        """Only a program's main process, or a torch.distributed rank, attaches."""
        data = sys.modules.get("torch.utils.data")
        try:
            if data is not None and data.get_worker_info() is not None:
                return False
        except Exception:
            pass
        mp = sys.modules.get("multiprocessing")
        child = os.getpid() != self.boot_pid
        try:
            child = child or (mp is not None and mp.parent_process() is not None)
        except Exception:
            pass
        if not child:
            return True
        dist = sys.modules.get("torch.distributed")
        try:
            return bool(dist is not None and dist.is_available() and dist.is_initialized())
        except Exception:
            return False

    def _consider(self, root: Any, args: Any = ()) -> None:
        if root in self.checked:
            return
        self.checked.add(root)
        if next(root.parameters(), None) is None and next(root.buffers(), None) is None:
            return
        if not self._eligible():
            return
        from vqdoctor.live.discovery import find_quantizers

        found = find_quantizers(root)
        upstream = self._upstream(args)
        if not found:
            self._watch_behaviour(root, upstream)
            return
        if any(_watched_already(q.module) for q in found):
            self._disarm()
            _say("the program runs vqdoctor.watch itself; the launcher's watch stands down")
            return
        self._attach(root, found, upstream=upstream)

    def _watch_behaviour(self, root: Any, upstream: list[Any]) -> None:
        """No known layout in this root: hook its candidate modules (`live.behaviour`); the first
        whose forward returns indices into its own table is watched (its root is the model)."""
        from vqdoctor.live.behaviour import candidates, confirms
        from vqdoctor.live.discovery import ModuleIndex

        index = ModuleIndex(root)
        handles: list[Any] = []

        def make(name: str) -> Any:
            def hook(m: Any, args: Any, output: Any) -> None:
                try:
                    if self.doctor is not None or self.done:
                        for h in handles:
                            h.remove()
                        return
                    if confirms(index.innermost(name) or m, output):
                        for h in handles:
                            h.remove()
                        self._attach(root, [], named=[name], upstream=upstream)
                except Exception as e:
                    for h in handles:
                        h.remove()
                    self._warn("behaviour", f"behaviour discovery failed ({type(e).__name__}: {e})")
            return hook

        for name, module in candidates(index, []):
            handles.append(module.register_forward_hook(make(name)))

    def _attach(self, root: Any, found: list[Any], named: list[str] | None = None,
                upstream: list[Any] | None = None) -> None:
        from vqdoctor.errors import ConfigError
        from vqdoctor.live.doctor import watch

        c = self.config
        kwargs = {"flush_every": int(c.get("flush_every") or 50), "stats_every": int(c.get("stats_every") or 10),
                  "window": c.get("window"), "command": c.get("command"), "quantizers": named}
        try:
            doctor = watch(root, c["run_dir"], tensorboard=c.get("tensorboard"), wandb=c.get("wandb") or None,
                           **kwargs)
        except ConfigError as e:  # an exporter this interpreter cannot load: watch without it
            self._warn("export", f"{e}; the run is recorded without that export")
            doctor = watch(root, c["run_dir"], **kwargs)
        self._disarm()  # the global hooks are no longer needed: the Doctor hooks the quantizers
        self.outputs = weakref.WeakKeyDictionary()
        doctor.set_upstream([m for m in upstream or [] if m is not root])
        doctor.start()
        self.doctor = doctor
        self.attach_pid = os.getpid()
        if doctor.rank == 0:
            names = ", ".join(q.name for q in doctor.quantizers[:4])
            more = f" (+{len(doctor.quantizers) - 4} more)" if len(doctor.quantizers) > 4 else ""
            n = len(doctor.quantizers)
            _say(f"watching {_model_name(root)}: {n} quantizer{'s' * (n != 1)} ({names}{more})"
                 f" -> {doctor.run_dir}")

    # ------------------------------------------------------------------ loss, exit

    def _loss(self, tensors: Any, args: tuple, kwargs: dict) -> None:
        try:
            grad = args[0] if args else kwargs.get("grad_tensors", kwargs.get("grad_variables"))
            if grad is not None:
                return
            t = tensors
            if isinstance(t, (tuple, list)):
                if len(t) != 1:
                    return
                t = t[0]
            import torch

            if (not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point()
                    or _compiling() or os.getpid() != self.attach_pid):
                return
            doc = self.doctor
            if doc.closed:
                return
            record = getattr(doc, "record_loss", None)
            if record is not None:
                record(t)
                return
            rec = getattr(doc, "_recorder", None)
            if rec is not None and not rec.closed:
                rec._record_loss(t)  # the device copy behind doctor.step(loss=...), without the step
        except Exception as e:
            self.loss_off = True
            self._warn("loss", f"loss capture disabled ({type(e).__name__}: {e}); training continues")

    def _at_exit(self) -> None:
        doc = self.doctor
        if doc is None or os.getpid() != self.attach_pid:
            return
        try:
            doc.close("failed" if self.failed else "finished")
        except Exception as e:
            self._warn("close", f"could not finish the run record ({type(e).__name__}: {e})")


def _storages(obj: Any, depth: int = 0) -> set[int]:
    """Storage addresses of the tensors in `obj` (a tensor, or tuples / lists / dicts of them)."""
    import torch

    if isinstance(obj, torch.Tensor):
        try:
            return {obj.untyped_storage().data_ptr()} if obj.numel() else set()
        except Exception:
            return set()
    if depth > 1:
        return set()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    out: set[int] = set()
    for x in list(items)[:8]:
        out |= _storages(x, depth + 1)
    return out


def _model_name(root: Any) -> str:
    """The class name of the model inside wrappers: `DDP(compile(Model))` reads "Model"."""
    wrappers = {"OptimizedModule": "_orig_mod", "DistributedDataParallel": "module",
                "DataParallel": "module", "FullyShardedDataParallel": "_fsdp_wrapped_module"}
    names = []
    for _ in range(8):
        names.append(type(root).__name__)
        inner = getattr(root, wrappers.get(names[-1], ""), None) if names[-1] in wrappers else None
        if inner is None:
            break
        root = inner
    return names[-1] if len(names) == 1 else f"{names[-1]} (in {', '.join(names[:-1])})"


def _watched_already(module: Any) -> bool:
    """True when vqdoctor's own recorder hooks are on this module (the program calls
    vqdoctor.watch itself)."""
    for hooks in (getattr(module, "_forward_hooks", {}), getattr(module, "_forward_pre_hooks", {})):
        for fn in list(hooks.values()):
            if getattr(fn, "__module__", "") == "vqdoctor.live.recorder":
                return True
    return False


__all__ = ["agent_boot"]
