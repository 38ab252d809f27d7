"""The HF model alone: recurrent-cache generation equals full-sequence argmax decoding, output
variance, golden reference import, exported directories loading without our package, the
tokenizer, bad inputs, and lm-evaluation-harness's HFLM on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kla_megatron.checkpoint import hf_io, names
from kla_megatron.hf import KLAConfig, KLAForCausalLM
from kla_megatron.ops import kla_core

GOLDEN = Path(__file__).resolve().parent / "golden"  # the paper's reference outputs (see its README.md)
ARCH = dict(vocab_size=61, hidden_size=16, kla_heads=2, d_state=4, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=32, kla_var_rank=4, scan_backend="torch")


def _model(pattern="K*K-", seed=0, **kw):
    torch.manual_seed(seed)
    config = KLAConfig(num_layers=len(pattern), layer_pattern=pattern, position_embedding="rope", **{**ARCH, **kw})
    model = KLAForCausalLM(config).eval()
    with torch.no_grad():  # larger dynamics than the init so that state actually matters
        for layer in model.model.layers:
            if layer.symbol == "K":
                layer.mixer.A_log.normal_(0, 0.5)
                layer.mixer.delta_raw.normal_(0, 1.0)
                layer.mixer.sensor_weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("pattern", ["KK-K", "K*K-"])
def test_greedy_generate_equals_full_forward_argmax(pattern):
    model = _model(pattern)
    prompt = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(3))
    lengths = []
    hook = model.model.register_forward_pre_hook(lambda mod, args, kw: lengths.append(
        (kw.get("input_ids") if kw.get("input_ids") is not None else args[0]).shape[1]), with_kwargs=True)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    hook.remove()
    assert lengths[0] == 5 and set(lengths[1:]) == {1}  # the prompt once, then one token per step (cache)
    with torch.no_grad():
        seq = prompt
        for _ in range(64):  # no cache: the whole sequence every step
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert out.shape == (1, 69)
    assert torch.equal(out, seq)
    assert len(set(seq[0, 5:].tolist())) > 1  # not a constant continuation


def test_cached_logits_equal_full_forward_and_variance():
    model = _model("K*K-")
    tokens = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens, use_cache=False, output_variance=True)
        first = model(tokens[:, :7], use_cache=True)
        cache = first.get("cache", first.get("past_key_values"))  # transformers 5.x / 4.x name
        assert cache is not None and cache.seen == 7
        rest = [model(tokens[:, t : t + 1], cache=cache).logits for t in range(7, 12)]
    stepped = torch.cat([first.logits] + rest, 1)
    torch.testing.assert_close(stepped, full.logits, rtol=1e-5, atol=1e-5)
    assert len(full.variances) == 2 and all(v.shape == (2, 12, 16) for v in full.variances)
    assert all(bool((v > 0).all()) for v in full.variances)


def test_reference_import_reproduces_golden_logits(tmp_path):
    from kla_megatron.checkpoint import cli

    data = np.load(GOLDEN / "kla_ref_model.npz")
    rc = cli.main(["reference-to-hf", str(GOLDEN / "kla_ref_model.npz"), str(tmp_path / "hf"), "--dtype", "fp64",
                   "--verify", "--tol", "1e-4"])
    assert rc == 0
    config, state = hf_io.load_hf(tmp_path / "hf")
    model = hf_io.hf_model(config, state, dtype=torch.float64)
    with torch.no_grad():
        logits = model(torch.from_numpy(data["tokens"]), use_cache=False).logits
    ref = torch.from_numpy(data["logits"])
    err = ((logits - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-6, err  # the reference runs its scan in fp32 (see tests/test_golden.py)


def _spm_model(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tok"), vocab_size=61,
                                   model_type="bpe", pad_id=3, minloglevel=2)
    return tmp_path / "tok.model"


def _export(model, out, tokenizer=None):
    state = {k: v.detach() for k, v in model.state_dict().items()}
    arch = {k: getattr(model.config, k) for k in names.ARCHITECTURE_KEYS}
    return hf_io.export_hf(state, hf_io.make_config(arch, scan_backend="auto"), out, tokenizer_model=tokenizer)


ISOLATED = r"""
import sys, json
sys.path = [p for p in sys.path if "kla_megatron" not in p and not p.rstrip("/").endswith("main") and p not in ("", ".")]
import importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("kla_megatron", "megatron"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
mod = sys.modules[type(model).__module__]
assert mod._pkg_scan is None, "the exported file must run on its own scan here"
core = sys.modules[mod.__name__.rsplit(".", 1)[0] + ".kla_core"]  # the copy next to modeling_kla.py
tokens = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(tokens, use_cache=False).logits
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps({"logits": logits.tolist(), "ids": tok("the lazy fox 12")["input_ids"],
                  "blocked": [m for m in sys.modules if m.startswith(("kla_megatron", "megatron"))],
                  "core": core.__file__}))
"""


def test_export_loads_without_our_package(tmp_path):
    import sentencepiece as spm

    model = _model("K*K-")
    tok = _spm_model(tmp_path)
    out = _export(model, tmp_path / "hf", tokenizer=tok)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_kla.KLAForCausalLM"
    assert (out / "modeling_kla.py").exists() and (out / "tokenizer.model").exists()
    assert (out / "kla_core.py").read_bytes() == Path(kla_core.__file__).read_bytes()
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(5))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    proc = subprocess.run([sys.executable, "-c", ISOLATED, str(out), json.dumps(tokens.tolist())], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = proc.stdout.rfind('{"logits"')
    assert start >= 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout[start:].splitlines()[0])
    assert result["blocked"] == []
    assert Path(result["core"]).is_relative_to(tmp_path / "hf_modules"), result["core"]
    with torch.no_grad():
        ours = model(tokens, use_cache=False).logits
    torch.testing.assert_close(torch.tensor(result["logits"]), ours, rtol=1e-5, atol=1e-5)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    assert result["ids"] == sp.encode("the lazy fox 12")


def test_bad_inputs_give_clear_errors(tmp_path):
    model = _model("KK-K")
    out = _export(model, tmp_path / "hf")
    hf_io.load_hf(out)  # the intact export loads
    # truncated safetensors
    bad = tmp_path / "trunc"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        hf_io.load_hf(bad)
    # wrong config: a field that changes shapes, and an invalid pattern
    cfg = json.loads((out / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(data)
    (bad / "config.json").write_text(json.dumps({**cfg, "d_state": 8}))
    with pytest.raises(ValueError, match="mis-shaped tensors.*A_log"):
        hf_io.load_hf(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "layer_pattern": "KK-"}))
    with pytest.raises(ValueError, match="layer_pattern"):
        hf_io.load_hf(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "layer_pattern": "KKK-"}))
    with pytest.raises(ValueError, match="missing tensors.*mlp.fc1|unexpected tensors"):
        hf_io.load_hf(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        hf_io.load_hf(bad)
    # missing shard of a sharded export
    sharded = hf_io.export_hf({k: v.detach() for k, v in model.state_dict().items()}, model.config,
                              tmp_path / "sharded", max_shard_size="2KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    hf_io.load_hf(sharded)
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match="shards .* missing"):
        hf_io.load_hf(sharded)


def test_lm_eval_hflm_loglikelihood(tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = _model("K*K-")
    tok = _spm_model(tmp_path)
    out = _export(model, tmp_path / "hf", tokenizer=tok)
    lm = HFLM(pretrained=str(out), trust_remote_code=True, device="cpu", batch_size=2, dtype="float32")
    requests = [Instance("loglikelihood", doc={}, arguments=(ctx, cont), idx=i)
                for i, (ctx, cont) in enumerate([("the quick brown", " fox"), ("the lazy", " dog number 7"),
                                                 ("jumps over", " the")])]
    results = lm.loglikelihood(requests)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    for (ctx, cont), (ll, _) in zip([r.arguments for r in requests], results):
        ctx_ids, whole = sp.encode(ctx), sp.encode(ctx + cont)
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = model(ids, use_cache=False).logits.log_softmax(-1)[0]
        n = len(ctx_ids)
        expected = sum(logp[t - 1, whole[t]].item() for t in range(n, len(whole)))
        assert ll == pytest.approx(expected, abs=1e-4)
