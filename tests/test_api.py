"""The public one-process model API (kla_megatron/api.py) from a fresh interpreter, as a script uses it."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_build_model_by_name_with_overrides_runs_forward_and_backward():
    res = _python("""
        import json, torch, kla_megatron
        model = kla_megatron.build_model("kla_tiny", num_layers=2, layer_pattern="K-", seed=3)
        again = kla_megatron.build_model("kla_tiny", num_layers=2, layer_pattern="K-", seed=3)
        other = kla_megatron.build_model("kla_tiny", num_layers=2, layer_pattern="K-", seed=4)
        ids = torch.randint(0, 512, (2, 16))
        logits = model(ids)
        model(ids, labels=torch.randint(0, 512, (2, 16))).mean().backward()
        print(json.dumps(dict(
            shape=list(logits.shape), layers=len(model.decoder.layers), training=model.training,
            same_seed_same_init=all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters())),
            other_seed_differs=any(not torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters())),
            every_grad=all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()))))
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == dict(shape=[2, 16, 512], layers=2, training=True, same_seed_same_init=True,
                       other_seed_differs=True, every_grad=True)


def test_api_errors_are_clear():
    res = _python("""
        import kla_megatron
        for call in (lambda: kla_megatron.build_model("no_such_model"),
                     lambda: kla_megatron.build_model("kla_tiny", not_a_field=1),
                     lambda: kla_megatron.build_model("kla_tiny", device="cuda"),
                     lambda: kla_megatron.load_model("/nonexistent/run")):
            try:
                call()
            except (FileNotFoundError, TypeError, ValueError) as exc:
                print(type(exc).__name__, "|", str(exc).splitlines()[0])
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4, res.stdout
    assert "no model config 'no_such_model'" in lines[0] and "kla_tiny" in lines[0]
    assert "not_a_field" in lines[1]
    assert "no CUDA GPU" in lines[2]
    assert "/nonexistent/run does not exist" in lines[3]


def test_every_shipped_model_config_builds_through_the_public_api():
    """Each configs/models/*.yaml at its real widths (one layer of each kind, a small vocabulary, so a
    7B's layers fit a CI machine): built by kla_megatron.build_model, the module's parameter count
    equals the count models/flops.num_parameters gives for that config."""
    res = _python("""
        import dataclasses, json, torch, kla_megatron
        from kla_megatron.configs import MODEL_CONFIG_DIR
        from kla_megatron.models import load_model_config, num_parameters
        out = {}
        for path in sorted(MODEL_CONFIG_DIR.glob("*.yaml")):
            cfg = load_model_config(path)
            kinds = "".join(dict.fromkeys(cfg.layer_pattern))
            model = kla_megatron.build_model(cfg, dtype=torch.bfloat16, num_layers=len(kinds), layer_pattern=kinds,
                                             vocab_size=256, max_seq_len=min(cfg.max_seq_len, 4096))
            small = dataclasses.replace(cfg, num_layers=len(kinds), layer_pattern=kinds, vocab_size=256)
            built = sum(p.numel() for p in model.parameters())
            out[path.stem] = [built, num_parameters(small), kinds]
            del model
        print(json.dumps(out))
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == {p.stem for p in (REPO / "configs" / "models").glob("*.yaml")}
    for name, (built, counted, kinds) in out.items():
        assert built == counted, (name, kinds, built, counted)
