"""What one KLA mixer keeps alive for backward, counted with saved-tensor hooks (bf16; the
Triton path, through the interpreter on CPU: the PyTorch scan is a reference, not lean).

Budget per token at the model's width (M = d_inner channels, bf16 = 2 bytes): the in-projection
output [z | gate] (4M bytes), the post-conv z (2M), the gated read-out that out_proj saves
(2M); without recompute also the scan's inputs and checkpoints and the gate's y. No fp32 copy
of any per-token tensor is kept. ``recompute_scan`` (train.recompute=selective) must cut the
rest away.
"""
import torch

from tests.dist_utils import run_on_ranks
from tests import test_model_helpers as h

B, L = 2, 32


def _saved_bytes_per_token(rank, world_size, recompute):
    h.setup_parallel()
    cfg = h.tiny_config("K", "plain", hidden_size=32, kla_heads=4, d_state=4, max_seq_len=L)
    model = h.build(cfg, dtype=torch.bfloat16, runtime_config=h.runtime("triton", recompute_scan=recompute))
    mixer = model.decoder.layers[0].mixer
    x = torch.randn(L, B, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    seen, fp32 = {}, []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        # count each storage once (views of one buffer share it), parameters (and views of them) not at all
        if t.untyped_storage().data_ptr() not in params and t.numel() >= B * L:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            if t.dtype == torch.float32 and t.numel() >= B * L * mixer.d_inner_local:
                fp32.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = mixer(x)
    out.float().sum().backward()  # the graph is valid
    return sum(seen.values()) / (B * L), mixer.d_inner_local, fp32


def test_mixer_saves_at_most_the_budget_and_selective_recompute_cuts_it():
    (plain, M, fp32), = run_on_ranks(_saved_bytes_per_token, world_size=1, args=(False,))
    (selective, _, fp32_sel), = run_on_ranks(_saved_bytes_per_token, world_size=1, args=(True,))
    assert not fp32 and not fp32_sel, f"fp32 per-token tensors kept for backward: {fp32 or fp32_sel}"
    # in_proj output (4M) + z (2M) + out_proj input (2M) + its own input (2·D = M), bf16
    assert selective <= 9 * M + 64, (selective, M)
    assert plain > selective + 4 * M, (plain, selective, M)  # the scan's inputs and checkpoints are gone
    assert plain <= 40 * M, (plain, M)
