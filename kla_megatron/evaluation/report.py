"""What ``kla-eval`` writes: ``results.json`` (lm-eval's results plus ours under ``kla_eval``),
``results.md`` (one row per task and metric) and, when asked, ``samples_<task>.jsonl``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def _json_default(obj):
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(obj)


def metric_rows(results: dict) -> List[tuple]:
    """(task, metric, value, stderr) for every metric of every task and group; the lm-eval
    filter name is appended to the metric unless it is the default ``none``."""
    rows = []
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            if section == "groups" and task in (results.get("results") or {}):
                continue  # lm-eval lists a group under results too
            for key in sorted(metrics):
                name, _, filt = key.partition(",")
                if not filt or name.endswith("_stderr"):
                    continue  # alias, sample counts; stderr goes with its metric
                metric = name if filt == "none" else f"{name} ({filt})"
                rows.append((task, metric, metrics[key], metrics.get(f"{name}_stderr,{filt}")))
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return "" if value in (None, "N/A") else str(value)


def markdown(results: dict, meta: dict) -> str:
    head = (f"Checkpoint `{meta['checkpoint']}` ({meta['kind']}"
            + (f", iteration {meta['iteration']}" if meta.get("iteration") is not None else "")
            + f"), {meta['device']} {meta['dtype']}, batch size {meta['batch_size']}, "
            + f"{meta['num_fewshot'] if meta.get('num_fewshot') is not None else 'task default'} shots"
            + (f", limit {meta['limit']}" if meta.get("limit") is not None else "") + ".\n\n")
    lines = ["| task | metric | value | stderr |", "|---|---|---|---|"]
    lines += [f"| {t} | {m} | {_fmt(v)} | {_fmt(s)} |" for t, m, v, s in metric_rows(results)]
    return head + "\n".join(lines) + "\n"


def write(out_dir, results: dict, meta: dict, samples: bool) -> Dict[str, Path]:
    """Write the files; returns their paths by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_example = results.pop("samples", None) or {}
    written = {"json": out_dir / RESULTS_JSON, "markdown": out_dir / RESULTS_MD}
    written["json"].write_text(json.dumps({**results, "kla_eval": meta}, indent=1, default=_json_default) + "\n")
    written["markdown"].write_text(markdown(results, meta))
    if samples:
        for task, items in per_example.items():
            path = out_dir / f"samples_{task}.jsonl"
            with open(path, "w") as f:
                for item in items:
                    f.write(json.dumps(item, default=_json_default) + "\n")
            written[f"samples_{task}"] = path
    return written
