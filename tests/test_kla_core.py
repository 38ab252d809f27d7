"""ops/kla_core.py is the one source of the layer's math for the package and for exported HF
models: it must stay importable on its own (torch only), and the export must ship every file the
HF modeling code imports from its own directory (tests/test_hf_model.py loads such an export
without our package)."""
import ast
import sys
from pathlib import Path

from kla_megatron.checkpoint import hf_io
from kla_megatron.hf import modeling_kla
from kla_megatron.ops import kla_core


def _imports(path: Path):
    """(top-level absolute module names, relative module names) imported anywhere in ``path``."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            absolute |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            (relative if node.level else absolute).add(node.module or "")
    return {m.split(".")[0] for m in absolute}, relative


def test_core_imports_only_torch_and_the_standard_library():
    absolute, relative = _imports(Path(kla_core.__file__))
    assert relative == set(), relative
    third_party = {m for m in absolute if m not in sys.stdlib_module_names}
    assert third_party == {"torch"}, third_party


def test_export_ships_every_module_the_modeling_file_imports_relatively():
    _, relative = _imports(Path(modeling_kla.__file__))
    shipped = {p.name for p in hf_io.MODELING_FILES}
    assert relative and {f"{m}.py" for m in relative} <= shipped, (relative, shipped)
    assert "modeling_kla.py" in shipped


def test_the_package_and_the_hf_model_share_the_core():
    """Inside the package, modeling_kla's `.kla_core` is ops/kla_core.py itself, not a copy."""
    assert modeling_kla.filter_step is kla_core.filter_step
    assert modeling_kla.torch_causal_conv1d is kla_core.torch_causal_conv1d
