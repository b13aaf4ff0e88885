"""A module that is also its own main function: `from unisd import train; train(config)`.

`unisd.train` and `unisd.evaluate` are modules (`from unisd import train as tr; tr.prepare(...)`) and the
library's two functions of the same names. Importing a submodule sets the package attribute of its name to the
module, so a function of that name in the package would be replaced the first time anything imported the
module; a callable module gives both meanings one object.
"""
from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_callable(name: str) -> None:
    """Calling module `name` calls its function of the same last name: unisd.train(...) is unisd.train.train(...)."""
    sys.modules[name].__class__ = _CallableModule
