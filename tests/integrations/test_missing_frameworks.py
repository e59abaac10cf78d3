"""``import sam_jax`` without JAX (or Optax), ``import sam_torch`` without torch: an error that
names the extra to install, still a ``ModuleNotFoundError`` with the missing module's name.

Each case runs in a fresh interpreter whose import system refuses the framework, as if it
were not installed (a meta path finder inserted before anything is imported).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

BLOCKED = set(sys.argv[1].split(","))
sys.meta_path.insert(0, NotInstalled())
try:
    import sam_core
    sam_core.validate_sam(rho=0.05, eps=1e-12, eta=0.01, adaptive=False)  # needs neither
    import %s
except ImportError as exc:  # what user code catches
    print(json.dumps(dict(type=type(exc).__name__, name=exc.name, message=str(exc),
                          cause=type(exc.__cause__).__name__)))
else:
    print(json.dumps(None))
"""


def _import_without(package: str, blocked: str) -> dict | None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE % package, blocked],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("package", "blocked", "extra"),
    [
        ("sam_jax", "jax", "jax"),
        ("sam_jax", "optax", "jax"),
        ("sam_torch", "torch", "torch"),
    ],
)
def test_import_without_the_framework_names_the_extra(package, blocked, extra):
    err = _import_without(package, blocked)
    assert err is not None
    assert err["type"] == "ModuleNotFoundError" and err["cause"] == "ModuleNotFoundError"
    assert err["name"] == blocked
    assert f'pip install "sam-opt[{extra}]"' in err["message"]
    assert err["message"].startswith(f"{package} needs ")
    assert f"No module named '{blocked}'" in err["message"]

