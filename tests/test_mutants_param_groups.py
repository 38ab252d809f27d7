"""Parameter-group rules of training/parameter marks on hand-made parameters
(training/param_groups.py): which parameters decay, each one's lr multiplier with and without a
GroupPolicy, the policy read from a run's config, and the groups handed to megatron-core and to
the torch/DeepSpeed optimizer. Written against bench/mutation.sh's surviving mutants."""
from types import SimpleNamespace

import pytest
import torch

from kla_megatron.training.param_groups import (GroupPolicy, group_multipliers, is_input_embedding, is_no_decay,
                                                megatron_config_overrides, torch_param_groups)


def _p(*shape, dtype=torch.float32, **marks):
    p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
    for k, v in marks.items():
        setattr(p, k, v)
    return p


@pytest.mark.parametrize("name, param, no_decay", [
    ("decoder.linear.weight", _p(2, 2), False),
    ("decoder.linear.weight", _p(2, 2, no_weight_decay=True), True),
    ("decoder.linear.weight", _p(2, 2, no_weight_decay=False), False),
    ("decoder.scale", _p(2), True),  # any 1-D parameter
    ("decoder.proj.bias", _p(2, 2), True),
    ("decoder.bias_table", _p(2, 2), False),
    ("decoder.final_norm.weight", _p(2, 2), True),
    ("decoder.Final_Norm.weight", _p(2, 2), True),
    ("embedding.word_embeddings.weight", _p(4, 2), True),
    ("embedding.position_embeddings.weight", _p(4, 2), True),
])
def test_no_decay_rules(name, param, no_decay):
    assert is_no_decay(name, param) is no_decay


def test_input_embedding_is_the_word_embedding_only():
    assert is_input_embedding("embedding.word_embeddings.weight")
    assert not is_input_embedding("output_layer.weight")


def test_multipliers_without_policy_follow_the_marks():
    assert group_multipliers("decoder.linear.weight", _p(2, 2)) == (1.0, 1.0)
    assert group_multipliers("mixer.A_log", _p(2, 2, lr_mult=0.1, no_weight_decay=True)) == (0.1, 0.0)
    assert group_multipliers("embedding.word_embeddings.weight", _p(4, 2)) == (1.0, 0.0)


def test_policy_defaults_change_nothing():
    assert GroupPolicy() == GroupPolicy(embedding_lr_mult=1.0, ssm_extra=(), ssm_lr_mult=0.1, decay_conv=True)
    for name, p in [("embedding.word_embeddings.weight", _p(4, 2)), ("mixer.conv_weight", _p(2, 1, 3)),
                    ("mixer.lambda_skip", _p(2, 2))]:
        assert group_multipliers(name, p, GroupPolicy()) == group_multipliers(name, p)


def test_policy_moves_extra_leaves_into_the_ssm_group():
    policy = GroupPolicy(embedding_lr_mult=10.0, ssm_extra=("lambda_skip",), ssm_lr_mult=0.25)
    assert group_multipliers("layers.0.mixer.lambda_skip", _p(2, 2, lr_mult=3.0), policy) == (0.25, 0.0)
    # an SSM-group leaf keeps the SSM lr even under a word-embedding name
    assert group_multipliers("word_embeddings.lambda_skip", _p(2, 2), policy) == (0.25, 0.0)
    # only the last name part counts
    assert group_multipliers("lambda_skip.linear.weight", _p(2, 2), policy) == (1.0, 1.0)


def test_policy_scales_the_input_embedding_lr():
    policy = GroupPolicy(embedding_lr_mult=10.0)
    assert group_multipliers("embedding.word_embeddings.weight", _p(4, 2, lr_mult=0.5), policy) == (5.0, 0.0)
    assert group_multipliers("output_layer.weight", _p(4, 2), policy) == (1.0, 1.0)


def test_policy_can_stop_decaying_the_conv_kernels():
    conv = _p(2, 1, 3)
    assert group_multipliers("mixer.conv_weight", conv, GroupPolicy(decay_conv=False)) == (1.0, 0.0)
    assert group_multipliers("mixer.conv_weight", conv, GroupPolicy(decay_conv=True)) == (1.0, 1.0)
    assert group_multipliers("mixer.conv_weight_x", conv, GroupPolicy(decay_conv=False)) == (1.0, 1.0)


def test_policy_from_config():
    model = SimpleNamespace(mixer=SimpleNamespace(ssm_lr_mult=0.2))
    train = SimpleNamespace(embedding_lr=None, lr=2.0, ssm_group_extra=["lambda_skip"], decay_conv=False)
    assert GroupPolicy.from_config(train, model) == GroupPolicy(1.0, ("lambda_skip",), 0.2, False)
    train.embedding_lr, train.decay_conv = 6.0, True
    assert GroupPolicy.from_config(train, model) == GroupPolicy(3.0, ("lambda_skip",), 0.2, True)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2, bias=True)  # weight decays, bias does not
        self.A_log = _p(2, 2, lr_mult=0.1, no_weight_decay=True)
        self.low = _p(2, 2, dtype=torch.bfloat16)
        self.frozen = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)


def test_torch_groups_are_sorted_and_skip_frozen_parameters():
    m = _Model()
    groups = torch_param_groups(m)
    assert [(g["lr_mult"], g["wd_mult"]) for g in groups] == [(0.1, 0.0), (1.0, 0.0), (1.0, 1.0)]
    ids = [[id(p) for p in g["params"]] for g in groups]
    assert ids == [[id(m.A_log)], [id(m.linear.bias)], [id(m.low), id(m.linear.weight)]]  # named_parameters order


def test_megatron_overrides_one_group_per_multipliers_and_dtype():
    m = _Model()
    overrides = megatron_config_overrides([m], GroupPolicy())
    got = {key.with_name_predicate.name: val for key, val in overrides.items()}
    assert got == {
        "lr0.1_wd0.0_float32": {"lr_mult": 0.1, "wd_mult": 0.0, "dtype": "float32"},
        "lr1.0_wd0.0_float32": {"lr_mult": 1.0, "wd_mult": 0.0, "dtype": "float32"},
        "lr1.0_wd1.0_bfloat16": {"lr_mult": 1.0, "wd_mult": 1.0, "dtype": "bfloat16"},
        "lr1.0_wd1.0_float32": {"lr_mult": 1.0, "wd_mult": 1.0, "dtype": "float32"},
    }
    members = {key.with_name_predicate.name: sorted(n for n, p in m.named_parameters()
                                                    if key.with_name_predicate.fn(p, n)) for key in overrides}
    assert members == {"lr0.1_wd0.0_float32": ["A_log"], "lr1.0_wd0.0_float32": ["linear.bias"],
                       "lr1.0_wd1.0_bfloat16": ["low"], "lr1.0_wd1.0_float32": ["frozen", "linear.weight"]}


def test_both_engines_group_by_the_policy():
    class Emb(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = torch.nn.Embedding(4, 2)
            self.linear = torch.nn.Linear(2, 2, bias=False)

    m, policy = Emb(), GroupPolicy(embedding_lr_mult=10.0)
    assert [(g["lr_mult"], g["wd_mult"]) for g in torch_param_groups(m, policy)] == [(1.0, 1.0), (10.0, 0.0)]
    overrides = megatron_config_overrides([m], policy)
    members = {key.with_name_predicate.name: [n for n, p in m.named_parameters() if key.with_name_predicate.fn(p, n)]
               for key in overrides}
    assert members == {"lr1.0_wd1.0_float32": ["linear.weight"], "lr10.0_wd0.0_float32": ["word_embeddings.weight"]}
