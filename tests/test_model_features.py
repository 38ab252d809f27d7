"""Single-process model features (one spawned gloo rank, float64, torch scan backend):

- packed sequences (cu_seqlens) give the same per-token loss as the documents run
  separately, for a pure KLA and a hybrid pattern;
- recurrent decoding (prefill, then one token at a time with the O(1) state) reproduces the
  full-sequence logits;
- activation recomputation (whole layers, or only the scan) leaves loss and gradients as is;
- the analytic parameter count equals an instantiated model's for a spread of settings.
"""
import pytest
import torch

from tests import test_model_helpers as h
from tests.dist_utils import run_on_ranks

DOCS = (5, 3)
COUNT_CASES = {
    "plain_untied": dict(pattern="K-K-", preset="plain"),
    "mamba_tied": dict(pattern="KK-", preset="mamba", tie_embeddings=True),
    "hybrid_gqa_rope": dict(pattern="K*-", num_query_groups=2, position_embedding="rope"),
    "layernorm_gelu": dict(pattern="K-*", normalization="LayerNorm", swiglu=False, ffn_hidden_size=48,
                           kla_heads=4, d_state=3, conv_kernel=2),
}


def _packed_vs_separate(pattern):
    from megatron.core.packed_seq_params import PackedSeqParams

    model = h.build(h.tiny_config(pattern, "plain"))
    h.det_init(model)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, h.V, (1, sum(DOCS)), generator=gen)
    labels = torch.randint(0, h.V, (1, sum(DOCS)), generator=gen)
    cu = torch.tensor([0, DOCS[0], sum(DOCS)], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(DOCS),
                             max_seqlen_kv=max(DOCS))
    with torch.no_grad():
        packed = model(tokens, None, None, labels=labels, packed_seq_params=params)
        separate = torch.cat([model(tokens[:, a:b], None, None, labels=labels[:, a:b])
                              for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
        unpacked = model(tokens, None, None, labels=labels)  # guards the test: packing matters
    return packed, separate, unpacked


def _decode_vs_full():
    model = h.build(h.tiny_config("K-K-", "mamba"))
    h.det_init(model)
    model.eval()
    tokens = torch.randint(0, h.V, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(tokens, None, None)
        state = model.new_inference_state(batch_size=2)
        steps = [model(tokens[:, :4], None, None, inference_state=state)]
        for t in range(4, 7):
            steps.append(model(tokens[:, t : t + 1], None, None, inference_state=state))
    return full, torch.cat(steps, dim=1)


def _recompute():
    out = {}
    variants = {"none": ({}, False), "full": (dict(recompute_granularity="full", recompute_method="uniform",
                                                   recompute_num_layers=1), False), "scan": ({}, True)}
    for name, (overrides, scan) in variants.items():
        model = h.build(h.tiny_config("K*K-", "plain"), runtime_config=h.runtime(recompute_scan=scan), **overrides)
        h.det_init(model)
        loss = h.run_schedule(model, h.batches())
        out[name] = (loss, {n: p.grad.clone() for n, p in model.named_parameters()})
    return out


def _counts():
    from kla_megatron.models import num_parameters

    counts = {}
    for name, case in COUNT_CASES.items():
        case = dict(case)
        cfg = h.tiny_config(case.pop("pattern"), case.pop("preset", "plain"), **case)
        model = h.build(cfg)
        counts[name] = (num_parameters(cfg), sum(p.numel() for p in model.parameters()))
    return counts


def _bf16_cast():
    """Float16Module-style model.bfloat16(): SSM parameters stay fp32 and exact."""
    model = h.build(h.tiny_config("K-", "plain"), dtype=torch.float32)
    h.det_init(model)
    mixer = model.decoder.layers[0].mixer
    before = {n: getattr(mixer, n).detach().clone() for n in mixer._FP32_PARAMS}
    model.bfloat16()
    after = {n: getattr(mixer, n).detach().clone() for n in mixer._FP32_PARAMS}
    loss = model(torch.randint(0, h.V, (1, 8)), None, None, labels=torch.randint(0, h.V, (1, 8)))
    return before, after, mixer.in_proj.weight.dtype, loss.dtype, bool(torch.isfinite(loss).all())


def _shim_state():
    from kla_megatron.compat import cpu_shim_hits, enable_cpu_megatron

    return enable_cpu_megatron(), enable_cpu_megatron(), sorted({shim for shim, _ in cpu_shim_hits()})


def _body(rank, world_size):
    h.setup_parallel(1, 1)
    return dict(
        shim=None,
        bf16=_bf16_cast(),
        packed={p: _packed_vs_separate(p) for p in ("K-K-", "K*K-")},
        decode=_decode_vs_full(),
        recompute=_recompute(),
        counts=_counts(),
    ) | dict(shim=_shim_state())


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_body, world_size=1)[0]


@pytest.mark.parametrize("pattern", ["K-K-", "K*K-"])
def test_packed_sequences_equal_separate_documents(results, pattern):
    packed, separate, unpacked = results["packed"][pattern]
    torch.testing.assert_close(packed, separate, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(unpacked[:, DOCS[0]:], separate[:, DOCS[0]:], rtol=1e-4)


def test_recurrent_decoding_matches_full_forward(results):
    full, stepped = results["decode"]
    assert stepped.shape == full.shape
    torch.testing.assert_close(stepped, full, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("variant", ["full", "scan"])
def test_recompute_keeps_loss_and_gradients(results, variant):
    base_loss, base_grads = results["recompute"]["none"]
    loss, grads = results["recompute"][variant]
    assert loss == pytest.approx(base_loss, rel=1e-12)
    for name, grad in base_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_parameter_formula_matches_instantiated_model(results, case):
    formula, actual = results["counts"][case]
    assert formula == actual


def test_bf16_cast_keeps_ssm_parameters_fp32(results):
    before, after, linear_dtype, loss_dtype, finite = results["bf16"]
    assert linear_dtype == torch.bfloat16 and loss_dtype == torch.float32 and finite
    for name, value in before.items():
        assert after[name].dtype == torch.float32, name
        assert torch.equal(after[name], value), name


SHIM_PROBE = """
import sys

import torch
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from kla_megatron.compat import cpu_shim_hits, enable_cpu_megatron

first = enable_cpu_megatron()
patched = (torch.cuda.current_device, torch.Tensor.cuda, WrappedTorchNorm.__new__, torch.cuda.get_rng_state)
second = enable_cpu_megatron()
assert (first, second) == (True, True), (first, second)
assert patched == (torch.cuda.current_device, torch.Tensor.cuda, WrappedTorchNorm.__new__,
                   torch.cuda.get_rng_state), "a second call patched again"
# A second device mode would turn 'torch.FloatTensor' into 'torch.cuda.cuda.FloatTensor'.
assert torch.zeros(2).type() == "torch.cuda.FloatTensor", torch.zeros(2).type()
line = sys._getframe().f_lineno; zeros = torch.zeros(2, device="cuda"); torch.cuda.current_device()
assert zeros.device.type == "cpu"
hits = {(shim, site.rsplit("/", 1)[-1]): n for (shim, site), n in cpu_shim_hits().items()}
assert hits[("torch.cuda.current_device", f"probe.py:{line}")] == 1, hits
assert hits[("device='cuda' in zeros", f"probe.py:{line}")] == 1, hits
print("ok")
"""


def test_cpu_shim_is_idempotent_and_records_call_sites(tmp_path):
    """In a fresh interpreter: a second enable_cpu_megatron() patches nothing again (same
    functions, one device mode), and each CUDA-only call is recorded once at its call site."""
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("the shim is inactive with CUDA")
    script = tmp_path / "probe.py"
    script.write_text(SHIM_PROBE.lstrip("\n"))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_cpu_shim_reached_megatron_cuda_paths(results):
    if torch.cuda.is_available():
        pytest.skip("the shim is inactive with CUDA")
    _, _, shims = results["shim"]
    # The runs above reached megatron's CUDA-only device and RNG paths through the shim.
    assert any(s == "torch.cuda.current_device" or s.startswith("device='cuda'") for s in shims), shims
    assert "megatron _get_cuda_rng_state" in shims