"""Checkpoint pruning (``checkpoint.keep_last``) and the resume errors a user meets, each a
one-line message from ``kla-pretrain`` (CPU/gloo, the tiny model of test_train.py):

- keep_last = N keeps the N newest complete checkpoints, never an incomplete one's place;
- a checkpoint named by ``checkpoint.resume`` that is incomplete (no manifest, a missing file)
  stops the run with exit 3 and one line naming the path and the problem;
- a checkpoint written by another engine stops it with exit 2 and one line naming both engines.
"""
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.dist_utils import run_on_ranks
from tests.test_checkpoint_faults import _main
from tests.test_train import _argv
from tests.tiny_models import write_tiny_model


def _iters(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("iter_"))


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> None:
    path = root / f"iter_{step:07d}"
    path.mkdir(parents=True)
    (path / "w.bin").write_bytes(b"x" * step)
    if complete:
        (path / "manifest.json").write_text(json.dumps({"files": {"w.bin": step}}))


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    from kla_megatron.checkpoint.directory import prune

    for step in (1, 2, 3, 10, 20):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 30, complete=False)  # newest, but partial: not one of the kept
    prune(str(tmp_path), 0)  # 0 = keep everything
    assert len(_iters(tmp_path)) == 6
    prune(str(tmp_path), 2)
    assert _iters(tmp_path) == ["iter_0000010", "iter_0000020", "iter_0000030"]
    prune(str(tmp_path), 1)
    assert _iters(tmp_path) == ["iter_0000020", "iter_0000030"]


def _body(rank, world, model_yaml, root):
    root = Path(root)
    out = {}
    # a real run: a checkpoint every step, keep the last 2
    ck = root / "ck"
    out["run"] = _main(_argv(model_yaml, ck, "--set", "checkpoint.save_interval=1", "--set", "checkpoint.keep_last=2"))
    out["kept"] = _iters(ck)
    # named explicitly, incomplete: no manifest, then a missing file
    no_manifest = root / "no_manifest" / "iter_0000006"
    shutil.copytree(ck / "iter_0000006", no_manifest)
    os.remove(no_manifest / "manifest.json")
    missing = root / "missing" / "iter_0000006"
    shutil.copytree(ck / "iter_0000006", missing)
    os.remove(missing / "model" / "common.pt")
    # written by the DeepSpeed engine (as its manifest says), resumed by megatron
    other = root / "other" / "iter_0000006"
    shutil.copytree(ck / "iter_0000006", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["layout"]["engine"] = "deepspeed"
    (other / "manifest.json").write_text(json.dumps(manifest))
    for name, path in (("no_manifest", no_manifest), ("missing", missing), ("engine", other)):
        out[name] = _main(_argv(model_yaml, root / f"{name}_out", "--set", f"checkpoint.resume={path}"))
        out[name] = (*out[name], str(path))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_resume")
    model_yaml = write_tiny_model(root / "tiny.yaml")
    return run_on_ranks(_body, world_size=1, args=(str(model_yaml), str(root)))[0]


def test_training_with_keep_last_keeps_the_newest(runs):
    rc, _, err, _ = runs["run"]
    assert rc == 0, err[-2000:]
    assert runs["kept"] == ["iter_0000005", "iter_0000006"]


@pytest.mark.parametrize("case, code, problem", [
    ("no_manifest", 3, "no manifest.json (partially written)"),
    ("missing", 3, "missing file model/common.pt"),
    ("engine", 2, "was written by engine 'deepspeed', this run uses engine 'megatron'"),
])
def test_resume_error_is_one_line(runs, case, code, problem):
    rc, out, err, _, path = runs[case]
    lines = [line for line in err.splitlines() if line.startswith("kla-pretrain:")]
    assert rc == code and len(lines) == 1 and "Traceback" not in err, (rc, err[-2000:])
    assert lines[0].startswith(f"kla-pretrain: error: checkpoint.resume: ") and path in lines[0], lines
    assert problem in lines[0], lines
    assert "step 1/" not in out  # nothing trained
