"""Register the linearized architectures with transformers' Auto classes without paying for it on every import.

Registration needs the linearized config and model classes, which subclass transformers' (importing those costs
2-3 s: torch plus the model modules). ``import linearize`` therefore only arranges it: if transformers' Auto
configuration module is already loaded it registers at once, otherwise a one-shot import hook registers right after
that module loads (once transformers' import graph has settled), i.e. before any ``AutoConfig`` / ``AutoModelForCausalLM`` call can look the types up. So
``import linearize`` keeps its documented meaning while ``linearize --help`` and ``import linearize.kernels`` stay
light.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

#: Either is loaded before an Auto class can resolve a model type (modeling_auto imports configuration_auto).
TRIGGERS = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")


def _register() -> None:
    for finder in [f for f in sys.meta_path if isinstance(f, _RegisterAfterAutoLoads)]:
        sys.meta_path.remove(finder)
    import linearize.models  # noqa: F401  (registers on import)


class _RegisterAfterAutoLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the normal loader of every transformers module and registers once a trigger
    module has loaded and the outermost transformers module being loaded has finished. Registering imports
    transformers' model classes; doing it while any transformers module is half-initialised (configuration_auto is
    also imported from deep inside modeling_utils) would be a circular import."""

    def __init__(self) -> None:
        self._resolving = False
        self._depth = 0  # transformers modules currently executing

    def find_spec(self, name, path=None, target=None):
        if self._resolving or not (name == "transformers" or name.startswith("transformers.")):
            return None
        self._resolving = True  # let find_spec below resolve the module through the other finders
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._resolving = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            self._depth += 1
            try:
                loader_exec(module)
            finally:
                self._depth -= 1
            if self._depth == 0 and any(t in sys.modules for t in TRIGGERS):
                _register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if any(t in sys.modules for t in TRIGGERS):
        _register()
    elif not any(isinstance(f, _RegisterAfterAutoLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterAutoLoads())
