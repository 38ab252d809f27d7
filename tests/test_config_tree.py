"""One configuration tree: ``RunConfig.model`` is a ``KLAModelConfig`` holding a ``KLAMixerConfig``;
how the model runs is a separate ``KLARuntimeConfig``; the checkpoint's stored model config and
the Hugging Face config are written from and checked against the same dataclasses; the padded
vocabulary has one rule; the configs load from an installed wheel."""
import dataclasses
import inspect
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from kla_megatron.checkpoint import names
from kla_megatron.configs import MODEL_CONFIG_DIR, RUN_CONFIG_DIR
from kla_megatron.models import (MODEL_CONFIG_FILE, KLAMixerConfig, KLAModelConfig, load_model_config,
                                 read_stored_model_config, save_model_config)
from kla_megatron.models.config import MIXER_FLAT_NAMES
from kla_megatron.training.config import load_run_config
from kla_megatron.training.model_factory import model_config

REPO = Path(__file__).resolve().parents[1]
MODELS = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))

# model_config.yaml as the trainer wrote it before the mixer section existed (flat, with the run's
# scan backend and recompute flag, the vocabulary padded): kla_tiny trained with kla_backend=torch.
OLD_STORED_KLA_TINY = """\
name: kla_tiny
vocab_size: 512
hidden_size: 64
num_layers: 4
layer_pattern: K-K-
kla_heads: 4
d_state: 8
expand: 2.0
conv_kernel: 4
preset: plain
kla_var_rank: null
scan_backend: torch
recompute_scan: true
ssm_lr_mult: 0.1
num_attention_heads: 4
num_query_groups: null
ffn_hidden_size: 192
swiglu: true
normalization: RMSNorm
norm_eps: 1.0e-05
tie_embeddings: true
position_embedding: none
rotary_base: 10000
max_seq_len: 256
init_std: 0.02
"""


def test_the_model_config_holds_the_mixer_config_and_copies_none_of_its_fields():
    cfg = load_model_config("kla_tiny")
    assert isinstance(cfg.mixer, KLAMixerConfig) and (cfg.mixer.num_heads, cfg.mixer.d_state) == (4, 8)
    own = {f.name for f in dataclasses.fields(KLAModelConfig)}
    mixer = {f.name for f in dataclasses.fields(KLAMixerConfig)}
    assert not own & (mixer | set(MIXER_FLAT_NAMES.values())), own & mixer
    assert not own & {"scan_backend", "recompute_scan"}  # run settings: KLARuntimeConfig
    assert cfg.d_inner == cfg.mixer.d_inner(cfg.hidden_size) == 128


@pytest.mark.parametrize("name", MODELS)
def test_each_named_model_round_trips_through_the_checkpoint_file_and_the_hf_config(name, tmp_path):
    cfg = load_model_config(name)
    assert cfg.name == name
    stored = save_model_config(cfg.with_padded_vocab(8), tmp_path)
    assert stored.name == MODEL_CONFIG_FILE
    assert read_stored_model_config(stored) == cfg.with_padded_vocab(8)
    # the flat form (what the model files write) reads back to the same config
    assert KLAModelConfig.from_dict(cfg.to_flat()) == cfg
    hf = names.hf_config_dict(cfg)
    back = names.model_config_from_hf(hf)
    names.check_same_architecture(cfg, back, "HF round trip")
    assert names.architecture_fields(back) == names.architecture_fields(cfg) and back.init_std == cfg.init_std


def test_the_hf_config_has_exactly_the_dataclasses_architecture_fields_and_defaults():
    """Adding a field to KLAModelConfig or KLAMixerConfig without adding it to the HF KLAConfig
    (or listing it in names.NOT_ARCHITECTURE) fails here."""
    pytest.importorskip("transformers")
    from kla_megatron.hf import KLAConfig

    params = inspect.signature(KLAConfig.__init__).parameters
    hf_fields = {n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD}
    runtime_only = {"scan_backend"}  # the standalone HF model picks its own kernels
    assert hf_fields - runtime_only == set(names.ARCHITECTURE_KEYS) | {names.HF_INIT_STD}
    assert set(KLAModelConfig.flat_keys()) == set(names.ARCHITECTURE_KEYS) | set(names.NOT_ARCHITECTURE)
    # the defaults agree too (the required fields have none on our side)
    ours = {f.name: f.default for f in dataclasses.fields(KLAModelConfig)}
    ours.update({MIXER_FLAT_NAMES.get(f.name, f.name): f.default for f in dataclasses.fields(KLAMixerConfig)})
    ours[names.HF_INIT_STD] = ours.pop("init_std")
    for key in hf_fields - runtime_only:
        if ours[key] is not dataclasses.MISSING and key != "layer_pattern":
            assert params[key].default == ours[key], key
    config = KLAConfig(**names.hf_config_dict(load_model_config("hybrid_1_3b")))
    assert names.model_config_from_hf(config).to_flat() | {"name": "hybrid_1_3b"} == \
        load_model_config("hybrid_1_3b").to_flat()


def test_a_checkpoint_model_config_written_by_the_old_flat_form_still_loads(tmp_path):
    (tmp_path / MODEL_CONFIG_FILE).write_text(OLD_STORED_KLA_TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the program wrote those run settings itself: no notice
        cfg = read_stored_model_config(tmp_path / MODEL_CONFIG_FILE)
    assert cfg == load_model_config("kla_tiny")


def test_old_run_settings_in_a_user_model_file_are_dropped_with_a_notice(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("vocab_size: 64\nhidden_size: 16\nnum_layers: 2\nkla_heads: 2\nscan_backend: torch\n")
    with pytest.warns(FutureWarning, match=r"'scan_backend: torch' is a run setting.*set train.kla_backend"):
        cfg = load_model_config(path)
    assert cfg.mixer.num_heads == 2 and cfg.name == "m"


@pytest.mark.parametrize("data, match", [
    (dict(vocab_size=8, hidden_size=16, num_layers=2, kla_head=2), r"unknown model config keys \['kla_head'\]"),
    (dict(vocab_size=8, hidden_size=16, num_layers=2, mixer=dict(kla_heads=2)), r"unknown mixer keys \['kla_heads'\]"),
    (dict(vocab_size=8, hidden_size=16, num_layers=2, d_state=4, mixer=dict(d_state=8)),
     r"'d_state' is set both at the top level and as mixer.d_state"),
    (dict(vocab_size=8, hidden_size=16, num_layers=2, mixer=4), r"'mixer' must be a mapping"),
])
def test_model_keys_are_checked_in_one_place(data, match):
    with pytest.raises(ValueError, match=match):
        KLAModelConfig.from_dict(data)


def test_the_nested_form_reads_like_the_flat_form():
    flat = KLAModelConfig.from_dict(dict(vocab_size=8, hidden_size=16, num_layers=2, kla_heads=2, kla_var_rank=4,
                                         preset="mamba", num_attention_heads=4))
    nested = KLAModelConfig.from_dict(dict(vocab_size=8, hidden_size=16, num_layers=2, num_attention_heads=4,
                                           mixer=dict(num_heads=2, var_rank=4, preset="mamba")))
    assert flat == nested and flat.to_dict()["mixer"]["num_heads"] == 2


def test_padded_vocabulary_has_one_rule():
    cfg = dataclasses.replace(load_model_config("kla_tiny"), vocab_size=50257)
    assert [cfg.padded_vocab_size(tp) for tp in (1, 2, 4, 8)] == [50304] * 4  # the same for every TP: reshards
    assert cfg.padded_vocab_size(3) % 384 == 0 and cfg.padded_vocab_size(3) >= 50257
    assert cfg.with_padded_vocab(2).vocab_size == 50304 and cfg.is_padding_of(50304)
    assert not cfg.is_padding_of(50257) and not cfg.is_padding_of(50300)
    small = dataclasses.replace(cfg, vocab_size=512)
    assert small.with_padded_vocab(4) is small  # already a multiple


def test_the_run_holds_the_model_and_the_runtime_is_separate():
    run = load_run_config("tiny_cpu", ["train.kla_backend=torch", "train.recompute=selective",
                                       "model.kla_heads=2", "model.d_state=4", "parallel.tensor=2"])
    assert isinstance(run.model, KLAModelConfig) and (run.model.mixer.num_heads, run.model.mixer.d_state) == (2, 4)
    runtime = run.runtime()
    assert (runtime.scan_backend, runtime.recompute_scan) == ("torch", True)
    built = model_config(run)  # what the trainer builds: only the vocabulary differs
    assert built == dataclasses.replace(run.model, vocab_size=run.model.padded_vocab_size(2))
    assert run.model.vocab_size == 512  # nothing was written back into the run's model


def test_model_inline_and_override_errors():
    base = {"train": {"steps": 10, "micro_batch_size": 1, "global_batch_size": 8}}
    run = load_run_config(raw={**base, "model": {"vocab_size": 64, "hidden_size": 16, "num_layers": 2,
                                                 "kla_heads": 2, "num_attention_heads": 4}})
    assert run.model.name == "kla" and run.model.mixer.num_heads == 2
    with pytest.raises(ValueError, match=r"unknown model config keys \['kla_hedas'\]"):
        load_run_config("tiny_cpu", ["model.kla_hedas=2"])
    with pytest.raises(ValueError, match=r"model: no model config 'nope'"):
        load_run_config("tiny_cpu", ["model=nope"])


@pytest.mark.slow
def test_configs_load_from_an_installed_wheel(tmp_path):
    """The wheel carries the configs as package data: a named model config and a run config load
    from an install with the working directory outside the checkout (about 30 s: builds a wheel)."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("kla_megatron-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    script = textwrap.dedent("""
        import json, kla_megatron
        from kla_megatron.models import load_model_config
        from kla_megatron.training.config import load_run_config
        model = load_model_config("kla_125m")
        run = load_run_config("tiny_cpu")
        print(json.dumps([kla_megatron.__file__, model.hidden_size, run.model.name]))
    """)
    # -S: no site processing, so the checkout's editable install (a .pth import hook) stays out;
    # the dependencies come from site-packages, after the install under test.
    import site

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), *site.getsitepackages()]))
    out = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    where, hidden, name = json.loads(out.stdout.strip().splitlines()[-1])
    assert where.startswith(str(target)) and (hidden, name) == (768, "kla_tiny")


def test_the_checkout_configs_link_is_the_package_directory():
    assert (REPO / "configs").resolve() == RUN_CONFIG_DIR
