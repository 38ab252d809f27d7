"""Run configs: loading, --set overrides, and the documented error messages."""
import pytest

from pathlib import Path

from kla_megatron.train import main, parse_args
from kla_megatron.training.config import CONFIG_DIR, load_run_config
from kla_megatron.training.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]
BASE = {"model": "kla_tiny", "train": {"steps": 100, "micro_batch_size": 2, "global_batch_size": 8}}


def _cfg(overrides=(), **raw):
    import copy

    d = copy.deepcopy(BASE)
    for section, values in raw.items():
        d.setdefault(section, {}).update(values) if isinstance(values, dict) else d.__setitem__(section, values)
    return load_run_config(raw=d, overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_shipped_run_configs_load_and_name_existing_models(name):
    from kla_megatron.models import KLAModelConfig, load_model_config

    cfg = load_run_config(name)
    assert isinstance(cfg.model, KLAModelConfig) and cfg.model == load_model_config(cfg.model.name)
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


def test_set_overrides_are_typed():
    cfg = _cfg(["train.lr=3e-4", "parallel.tensor=2", "data.blend=[a, b]", "checkpoint.dir=/x",
                "logging.wandb.enabled=true"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.parallel.tensor == 2 and cfg.data.blend == ["a", "b"] and cfg.checkpoint.dir == "/x"
    assert cfg.logging.wandb.enabled is True


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], r"unknown key 'train.lrr' in the config / --set overrides \(did you mean 'train.lr'\?\)"),
    (["trian.lr=1"], r"unknown key 'trian' .*did you mean 'train'"),
    (["train.steps=ten"], r"train.steps: expected int, got 'ten'"),
    (["train.lr"], r"bad --set override 'train.lr': expected KEY=VALUE"),
    (["train.micro_batch_size=3"], r"batch sizes: global_batch_size 8 is not divisible by micro_batch_size 3"),
    (["parallel.tensor=0"], r"parallel layout: parallel.tensor must be >= 1, got 0"),
    (["parallel.sequence_parallel=true"], r"parallel layout: sequence_parallel needs parallel.tensor > 1"),
    (["train.precision=fp16"], r"train.precision must be one of \['bf16', 'fp32'\], got 'fp16'"),
    (["train.lr_schedule=step"], r"train.lr_schedule must be one of"),
    (["engine=deepspeed", "parallel.tensor=2", "train.nan_policy=abort"],
     r"engine 'deepspeed' does not support parallel.tensor=2 \(data parallel only\)"),
    (["engine=deepspeed"], r"engine 'deepspeed' does not support train.nan_policy 'skip'"),
    (["deepspeed.zero_stage=2", "deepspeed.offload_param=true"], r"offload_param needs deepspeed.zero_stage 3"),
    (["data.kind=indexed"], r"data: kind 'indexed' needs data.blend"),
    (["data.kind=indexed", "data.blend=[x]"], r"data: kind 'indexed' needs data.tokenizer"),
    (["data.split=90,10"], r"data.split must be three comma-separated numbers"),
    (["train.warmup_steps=500"], r"train.warmup_steps must be in \[0, train.steps=100\]"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        _cfg(overrides)


@pytest.mark.parametrize("world, overrides, message", [
    (6, ["parallel.tensor=4"], r"parallel layout: world size 6 is not divisible by tensor\*pipeline\*context = "
                               r"4\*1\*1 = 4"),
    (8, ["parallel.data=2"], r"parallel layout: parallel.data=2 but world size 8 .* gives data-parallel size 8"),
    (8, ["train.micro_batch_size=2"], r"batch sizes: global_batch_size 8 is not divisible by micro_batch_size 2 "
                                      r"\* data-parallel size 8"),
])
def test_layout_errors_against_world_size(world, overrides, message):
    with pytest.raises(ValueError, match=message):
        _cfg(overrides).validate_world(world)
    assert _cfg().validate_world(4) == 4


def test_missing_data_path_is_named(tmp_path):
    cfg = _cfg(["data.kind=indexed", f"data.blend=[{tmp_path}/nope_text_document]", "data.tokenizer=t.model"])
    with pytest.raises(ValueError, match=r"data: path '.*nope_text_document' has no .*\.bin/\.idx .*prepare_sample"):
        cfg.data.check_paths()
    cfg = _cfg(["data.kind=indexed", f"data.blend=[[0.3, {tmp_path}/a], [0.7, {tmp_path}/b]]", "data.tokenizer=t"])
    assert cfg.data.weights_and_prefixes() == ([0.3, 0.7], [f"{tmp_path}/a", f"{tmp_path}/b"])


def test_cli_reports_config_errors_with_exit_status_2(capsys):
    assert main(["--config", "tiny_cpu", "--set", "train.lrr=1", "--dry-run"]) == 2
    assert "unknown key 'train.lrr'" in capsys.readouterr().err
    assert main(["--config", "tiny_cpu", "--set", "train.lr=1e-3", "--dry-run"]) == 0
    assert "lr: 0.001" in capsys.readouterr().out
    assert parse_args(["--config", "x", "--set", "a=1", "--set", "b=2"]).overrides == ["a=1", "b=2"]


def test_schedules():
    cos = _cfg(["train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1"]).train
    assert lr_at(cos, 0) == pytest.approx(0.1) and lr_at(cos, 9) == pytest.approx(1.0)
    assert lr_at(cos, 10) == pytest.approx(1.0) and lr_at(cos, 55) == pytest.approx(0.55)
    assert lr_at(cos, 100) == pytest.approx(0.1)
    wsd = _cfg(["train.lr_schedule=wsd", "train.warmup_steps=10", "train.decay_steps=20", "train.lr=1.0",
                "train.min_lr=0.0"]).train
    assert lr_at(wsd, 50) == 1.0 and lr_at(wsd, 79) == 1.0
    assert lr_at(wsd, 89) == pytest.approx(0.5) and lr_at(wsd, 99) == pytest.approx(0.0)


@pytest.mark.parametrize("argv, message", [
    (["--config", "tiny_cpu", "--set", "train.lr=[1,"],
     "--set 'train.lr=[1,': invalid YAML (line 1, column 4): expected the node content"),
    (["--config", "{bad}"], "invalid YAML (line 2, column 1)"),
    (["--config", "tiny_cpu", "--set", "model={bad}"], "invalid YAML (line 2, column 1)"),
    (["--config", "{dir}/tiny_cpux.yaml"], "no such file; did you mean '{dir}/tiny_cpu.yaml'?"),
    (["--config", "tiny_cpux"], "run config 'tiny_cpux' not found: neither a file nor a name in"),
])
def test_malformed_yaml_and_missing_configs_are_one_line_errors(argv, message, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [\n")
    (tmp_path / "tiny_cpu.yaml").write_text((REPO / "configs" / "tiny_cpu.yaml").read_text())
    fill = {"bad": bad, "dir": tmp_path}
    assert main([a.format(**fill) for a in argv] + ["--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kla-pretrain: error: ") and "\n" not in err, err
    assert message.format(**fill) in err, err

