"""The error for a backend package imported without its framework installed."""

from __future__ import annotations

import importlib

__all__ = ["require"]

#: What each backend needs, and the extra of the ``sam-opt`` distribution that installs it.
_NEEDS = {
    "sam_torch": (("torch",), "PyTorch", "torch"),
    "sam_jax": (("jax", "optax"), "JAX and Optax", "jax"),
}


def require(package: str) -> None:
    """Import ``package``'s framework, or raise ``ModuleNotFoundError`` naming the extra.

    The error is a ``ModuleNotFoundError`` (an ``ImportError``) with the missing module's
    ``name``, as Python's own, so ``except ImportError`` and ``pytest.importorskip`` keep
    working; only its message changes, from "No module named 'jax'" to what to install.
    A framework that is installed but fails to import for another reason raises as it is.
    """
    modules, what, extra = _NEEDS[package]
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            root = (exc.name or "").partition(".")[0]
            if root not in (module, "jaxlib"):  # a dependency of the framework: its own error
                raise
            raise ModuleNotFoundError(
                f"{package} needs {what}, and {exc.name!r} is not installed ({exc}); "
                f'install {package}\'s extra: pip install "sam-opt[{extra}]"',
                name=exc.name,
            ) from exc
