"""negmerge: machine unlearning by sign-consensual weight negation (NegMerge, ICML 2025).

The public API is imported lazily so that ``negmerge --help`` answers without importing
torch:

>>> import negmerge_cli
>>> report = negmerge_cli.merge("base.safetensors", ["ft1.safetensors", "ft2.safetensors"],
...                             "out.safetensors", lam=1.0)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "merge": "negmerge_cli.engine",
    "apply": "negmerge_cli.engine",
    "inspect": "negmerge_cli.inspection",
    "METHODS": "negmerge_cli.methods",
    "load_recipe": "negmerge_cli.recipes",
}

__all__ = ["METHODS", "__version__", "apply", "inspect", "load_recipe", "merge"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'negmerge_cli' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
