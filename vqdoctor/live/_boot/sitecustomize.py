"""vqdoctor's start-up hook for `vqdoctor watch` (only on the PYTHONPATH of a watched command).

Python imports `sitecustomize` at start-up in every interpreter; `vqdoctor watch` puts the folder
holding this file first on `PYTHONPATH`, so every Python process of the watched command (the
script, `torchrun` and its workers, `python -m pkg.train`, subprocesses) runs this file first.
It must be cheap and must never break the program:

1. **Chain**: the `sitecustomize` this file shadows (the next one on `sys.path`, e.g. a
   distribution's or a virtual environment's) is run as Python would have run it.
2. **Arm**: when `VQDOCTOR_WATCH` holds the watch configuration (JSON), a one-shot import hook
   (`sys.meta_path` finder) waits for `torch`. Nothing else is imported, so an interpreter that
   never imports torch pays a few microseconds.
3. **Hand over**: right after `torch` has finished importing, `vqdoctor.live.agent.agent_boot`
   registers the global hooks that find the model at its first forward (see that module).

Any failure prints one line to stderr (`vqdoctor: warning: ...`) and the program runs unwatched.
Names here start with `_` (this module takes the name `sitecustomize` in the program).
"""

from __future__ import annotations

import os as _os
import sys as _sys

_ENV = "VQDOCTOR_WATCH"
_HERE = _os.path.dirname(_os.path.realpath(__file__))


def _vqdoctor_warn(message: str) -> None:
    try:
        _sys.stderr.write(f"vqdoctor: warning: {message}; the program runs unwatched\n")
        _sys.stderr.flush()
    except Exception:
        pass


def _vqdoctor_chain() -> None:
    """Run the `sitecustomize` that this one shadows, if there is one."""
    import importlib.machinery
    import importlib.util

    me = _os.path.realpath(__file__)
    for entry in list(_sys.path):
        try:
            if not entry or _os.path.realpath(entry) == _HERE:
                continue
            spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [entry])
        except Exception:
            continue
        if spec is None or spec.loader is None:
            continue
        if spec.origin and _os.path.realpath(spec.origin) == me:
            continue
        module = importlib.util.module_from_spec(spec)
        mine = _sys.modules.get("sitecustomize")
        # the shadowed module takes the name, as if Python had imported it directly
        _sys.modules["sitecustomize"] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # what site.py does with a failing sitecustomize: report, go on
            if mine is not None:
                _sys.modules["sitecustomize"] = mine
            try:
                _sys.stderr.write(f"Error in sitecustomize ({spec.origin}); "
                                  f"{type(e).__name__}: {e}\n")
            except Exception:
                pass
        return


class _VQDoctorTorchFinder:
    """A `sys.meta_path` finder that fires once, when `torch` is imported, and then steps aside."""

    def __init__(self, config: dict) -> None:
        self.config = config
        self.fired = False

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if name != "torch" or self.fired:
            return None
        self.fired = True
        try:
            _sys.meta_path.remove(self)
        except ValueError:
            pass
        spec = None
        for finder in list(_sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original = loader.exec_module
        config = self.config

        def exec_module(module: object) -> None:
            original(module)
            try:
                loader.exec_module = original
            except Exception:
                pass
            _vqdoctor_torch_loaded(config)

        try:
            loader.exec_module = exec_module
        except Exception:
            _vqdoctor_warn("cannot hook the import of torch")
        return spec


def _vqdoctor_torch_loaded(config: dict) -> None:
    """torch is imported: start vqdoctor's agent (never raises)."""
    try:
        try:
            from vqdoctor.live import agent
        except ImportError:
            # the watched command runs another environment: use the vqdoctor that launched it
            extra = config.get("path")
            if not extra or extra in _sys.path:
                raise
            _sys.path.append(extra)
            from vqdoctor.live import agent
        agent.agent_boot(config)
    except Exception as e:
        _vqdoctor_warn(f"could not start the watch ({type(e).__name__}: {e})")


def _vqdoctor_boot() -> None:
    try:
        _vqdoctor_chain()
    except Exception:
        pass
    raw = _os.environ.get(_ENV)
    if not raw:
        return
    try:
        import json

        config = json.loads(raw)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except Exception as e:
        _vqdoctor_warn(f"bad {_ENV} configuration ({type(e).__name__}: {e})")
        return
    try:
        if "torch" in _sys.modules:  # imported by a chained sitecustomize or a .pth file
            _vqdoctor_torch_loaded(config)
        else:
            _sys.meta_path.insert(0, _VQDoctorTorchFinder(config))
    except Exception as e:
        _vqdoctor_warn(f"could not arm the import hook ({type(e).__name__}: {e})")


_vqdoctor_boot()
