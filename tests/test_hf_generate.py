"""The HF model under transformers' generation machinery: left-padded batches (padding leaves
the KLA state alone and is masked in attention), beam search (cache reordering), gradient
checkpointing and generate(inputs_embeds=...). Every check compares against the plain
single-sequence path."""
import pytest
import torch

from tests.test_hf_model import _model


def _left_padded(lengths, seed=7, pad=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 61, (n,), generator=g) for n in lengths]
    L = max(lengths)
    ids = torch.full((len(lengths), L), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = p, 1
    return prompts, ids, mask


@pytest.mark.parametrize("pattern", ["KK-K", "K*K-"])
def test_padded_forward_equals_each_row_alone(pattern):
    model = _model(pattern)
    prompts, ids, mask = _left_padded([5, 9, 2, 7])
    mask[3, -2:] = 0  # a row padded on both sides (lm-eval pads on the right)
    mask[1, 3] = 0  # and one with a hole: RoPE positions must skip it too
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=False, output_variance=True)
        for i in range(len(prompts)):
            real = mask[i].bool()
            alone = model(ids[i, real][None], use_cache=False, output_variance=True)
            torch.testing.assert_close(out.logits[i, real], alone.logits[0], rtol=1e-5, atol=1e-5)
            for v, va in zip(out.variances, alone.variances):
                torch.testing.assert_close(v[i, real], va[0], rtol=1e-5, atol=1e-6)
        assert torch.isfinite(out.logits).all()  # padded positions too (no NaN from all-masked rows)


@pytest.mark.parametrize("pattern", ["KK-K", "K*K-"])
def test_left_padded_greedy_generate_equals_each_prompt_alone(pattern):
    model = _model(pattern)
    prompts, ids, mask = _left_padded([5, 9, 2])
    with torch.no_grad():
        kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  output_scores=True)
        res = model.generate(ids, attention_mask=mask, **kw)
        out = res.sequences
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], **kw)
            assert out[i, ids.shape[1]:].tolist() == alone.sequences[0, len(p):].tolist(), i
            torch.testing.assert_close(torch.stack(res.scores)[:, i], torch.stack(alone.scores)[:, 0], rtol=1e-5,
                                       atol=1e-5)
        # cached prefill + decode of the padded batch gives the uncached logits of the whole padded batch
        full = model(out, attention_mask=torch.cat([mask, torch.ones(3, 12, dtype=torch.long)], 1),
                     use_cache=False).logits
        first = model(ids, attention_mask=mask, use_cache=True)
        cache, stepped, m = first.get("cache", first.get("past_key_values")), [first.logits], mask
        for t in range(ids.shape[1], out.shape[1]):
            m = torch.cat([m, torch.ones(3, 1, dtype=torch.long)], 1)
            stepped.append(model(out[:, t : t + 1], attention_mask=m, cache=cache).logits)
    real = torch.cat([mask, torch.ones(3, 12, dtype=torch.long)], 1).bool()
    torch.testing.assert_close(torch.cat(stepped, 1)[real], full[real], rtol=1e-5, atol=1e-5)


def test_reorder_cache_moves_every_state():
    model = _model("K*K-")
    _, ids, mask = _left_padded([4, 6, 3])
    nxt = torch.randint(1, 61, (3, 1), generator=torch.Generator().manual_seed(8))
    beam_idx = torch.tensor([2, 0, 0])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = model._reorder_cache(out.get("cache", out.get("past_key_values")), beam_idx)
        assert torch.equal(cache.mask, mask[beam_idx].bool())
        m = torch.cat([mask[beam_idx], torch.ones(3, 1, dtype=torch.long)], 1)
        got = model(nxt, attention_mask=m, cache=cache).logits
        ref = model(torch.cat([ids[beam_idx], nxt], 1), attention_mask=m, use_cache=False).logits[:, -1:]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_beam_search_equals_uncached_beam_search():
    model = _model("K*K-")
    _, ids, mask = _left_padded([5, 3], seed=11)
    kw = dict(attention_mask=mask, num_beams=3, max_new_tokens=10, min_new_tokens=10, do_sample=False,
              pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        cached = model.generate(ids, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=1e-5, atol=1e-5)
    assert (cached.beam_indices[:, :10] != torch.arange(2)[:, None] * 3).any()  # beams were actually reordered


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _model("K*K-").train()
    tokens = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(9))

    def grads():
        model.zero_grad()
        model(tokens, labels=tokens, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    calls = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    checkpointed = grads()
    hook.remove()
    assert len(calls) == 2  # forward, then the recompute in backward (a post-hook may be skipped: early stop)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-6, atol=1e-7, msg=n)


def test_generate_from_inputs_embeds_equals_from_ids():
    model = _model("K*K-")
    _, ids, mask = _left_padded([6, 4], seed=12)
    with torch.no_grad():
        from_ids = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  pad_token_id=0)
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                                     do_sample=False, pad_token_id=0)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])  # generate returns only new tokens for embeds
