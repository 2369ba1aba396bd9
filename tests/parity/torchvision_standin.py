"""An import-only stand-in for torchvision in the parity reference environment.

timm 0.4.12 and ``lavis.common.utils`` import torchvision at module level but the parity run never
calls it; the torchvision build that matches torch 2.13 on the registries needs CUDA libraries.
Installed as ``torchvision/__init__.py``: every ``torchvision.*`` module exists, and every name in
it is a placeholder class that fails loudly when used.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+standin"


class _Unavailable:
    """A placeholder for any torchvision name: importable, subclassable, never usable."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("torchvision is an import-only stand-in in the parity reference environment")


class _StandinModule(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandinModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _StandinModule
