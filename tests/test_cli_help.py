"""Every console script answers ``--help`` without importing torch or megatron-core (they take
seconds to import; the help must not), and its help text has no reST markup."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]

PROBE = """
import sys, importlib
module, func = sys.argv[1].split(":")
try:
    getattr(importlib.import_module(module), func)(["--help"])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "megatron", "triton") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_is_light_and_plain(name):
    out = subprocess.run([sys.executable, "-c", PROBE, SCRIPTS[name]], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    help_text, heavy = out.stdout.rsplit("HEAVY=", 1)
    assert "usage:" in help_text
    assert heavy.strip() == "", f"{name} --help imported {heavy.strip()}"
    assert "``" not in help_text, f"{name} --help shows reST markup"
