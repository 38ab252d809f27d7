"""recipes/fineweb_edu/run.sh end to end on CPU, on tiny generated parquet shards: the recipe's
own commands (tokenizer → preprocess → train → convert → evaluate), shrunk only through its
settings (a tiny model and vocabulary, a few steps, the local eval tasks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import write_tiny_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "fineweb_edu" / "run.sh"


def _shards(out: Path, n: int = 3) -> Path:
    """FineWeb-Edu-like shards: parquet files with a `text` column and other columns beside it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_tools.sample_corpus import sample_documents

    docs = [text for _, text in sample_documents() if text.strip()][:90]
    out.mkdir(parents=True)
    for i in range(n):
        part = docs[i::n]
        table = pa.table({"text": part, "id": [f"doc-{i}-{j}" for j in range(len(part))],
                          "score": [3.5] * len(part)})
        pq.write_table(table, out / f"{i:03d}_00000.parquet", row_group_size=8)
    return out


@pytest.mark.slow
def test_recipe_runs_end_to_end_on_tiny_parquet(tmp_path):
    parquet = _shards(tmp_path / "fineweb-edu")
    model = write_tiny_model(tmp_path / "tiny_model.yaml", num_layers=2, layer_pattern="K-", num_attention_heads=2,
                             tie_embeddings=False)
    work = tmp_path / "work"
    env = dict(os.environ, PARQUET=str(parquet), WORK=str(work), VOCAB="400", WORKERS="2", TOKENIZER_SAMPLE="64K",
               LAUNCH=f"{sys.executable} -m kla_megatron.train",
               TRAIN_ARGS=" ".join(f"--set {kv}" for kv in (
                   f"model={model}", "train.steps=3", "train.seq_length=64", "train.micro_batch_size=2",
                   "train.global_batch_size=4", "train.eval_interval=0", "checkpoint.save_interval=3",
                   "logging.interval=1", "parallel.tensor=1", "train.kla_backend=auto")),
               TASKS="kla_mc,kla_lambada",
               EVAL_ARGS=f"--include-path {REPO / 'tests' / 'data' / 'eval_tasks'} --batch-size 4 --device cpu")
    res = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    stages = [line for line in res.stdout.splitlines() if line.startswith("== ")]
    assert stages == ["== tokenizer", "== preprocess", "== train", "== convert", "== evaluate"]

    assert (work / "tokenizer" / "fineweb_edu.tiktoken").is_file()
    assert (work / "data" / "fineweb_edu_text_document.bin").is_file()
    assert (work / "hf" / "model.safetensors").is_file()
    results = json.loads((work / "scores" / "results.json").read_text())
    assert set(results["results"]) >= {"kla_mc", "kla_lambada"}
    for task, metrics in results["results"].items():
        values = [v for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k]
        assert values and all(v == v for v in values), (task, metrics)  # scored, no NaN
    assert (work / "scores" / "results.md").read_text().count("kla_") >= 2

    # preprocess killed before the merge: the rerun skips the finished shards and merges the same bytes
    merged = {p.suffix: p.read_bytes() for p in (work / "data").glob("fineweb_edu_text_document.*")}
    assert set(merged) == {".bin", ".idx"}
    for suffix in merged:
        (work / "data" / f"fineweb_edu_text_document{suffix}").unlink()
    again = subprocess.run(["bash", str(SCRIPT), "preprocess"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(3 already finished" in again.stdout + again.stderr, again.stdout + again.stderr
    for suffix, data in merged.items():
        assert (work / "data" / f"fineweb_edu_text_document{suffix}").read_bytes() == data
    done = subprocess.run(["bash", str(SCRIPT), "preprocess"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "exists" in done.stdout


def test_recipe_refuses_unknown_sizes_and_stages(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=dict(os.environ, SIZE="7b"), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "no run config configs/paper_kla_7b.yaml" in res.stderr
    res = subprocess.run(["bash", str(SCRIPT), "pretrain"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown stage 'pretrain'" in res.stderr
