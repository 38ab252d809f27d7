"""The KLA mixer on its fused path (Triton conv + SiLU, sensor activations, scan without y_var,
output gate; through the interpreter on CPU) against the same mixer in float64 on the
sequential reference path: output and every parameter and input gradient, with and without
packed documents, with and without selective recompute."""

import pytest
import torch

from tests import test_model_helpers as h
from tests.dist_utils import run_on_ranks

L = 24
DOCS = [0, 5, 6, L]  # a 1-token document in the middle


def _run(mixer, x, packed):
    from megatron.core.packed_seq_params import PackedSeqParams

    psp = None
    if packed:
        cu = torch.tensor(DOCS, dtype=torch.int32)
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=L, max_seqlen_kv=L)
    x = x.detach().clone().requires_grad_()
    out, _ = mixer(x, packed_seq_params=psp)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out.double() * cot).sum().backward()
    grads = {n: p.grad.double() for n, p in mixer.named_parameters()}
    grads["x"] = x.grad.double()
    return out.detach().double(), grads


def _compare(rank, world_size, packed, recompute):
    h.setup_parallel()
    cfg = h.tiny_config("K", "plain", hidden_size=16, kla_heads=2, d_state=4, max_seq_len=L)
    ref = h.build(cfg, dtype=torch.float64, runtime_config=h.runtime("naive")).decoder.layers[0].mixer
    with torch.no_grad():  # a conv bias and λ_skip away from their zero/constant init
        ref.conv_bias.normal_(generator=torch.Generator().manual_seed(1))
        ref.lambda_skip.fill_(-0.7)
    fused_runtime = h.runtime("triton", recompute_scan=recompute)
    fused = h.build(cfg, dtype=torch.float32, runtime_config=fused_runtime).decoder.layers[0].mixer
    fused.load_state_dict(ref.state_dict())  # copies cast to fp32
    b = 1 if packed else 2
    x = torch.randn(L, b, cfg.hidden_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out_ref, grad_ref = _run(ref, x, packed)
    out, grad = _run(fused, x.float(), packed)
    rel = lambda a, r: ((a - r).norm() / r.norm().clamp_min(1e-300)).item()  # noqa: E731
    return rel(out, out_ref), {n: rel(grad[n], g) for n, g in grad_ref.items()}


@pytest.mark.parametrize("packed,recompute", [(False, False), (True, False), (True, True)])
def test_fused_mixer_matches_float64_reference(packed, recompute):
    (out_err, grad_errs), = run_on_ranks(_compare, world_size=1, args=(packed, recompute))
    assert out_err < 1e-5, out_err
    bad = {n: e for n, e in grad_errs.items() if not e < 1e-4}
    assert not bad, f"gradients off the float64 reference: {bad}"
