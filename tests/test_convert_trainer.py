"""kla-convert and checkpoint.init_from on what the trainer writes.

Everything starts from real trainer runs: the README's main job (configs/tiny_cpu.yaml on the
sample corpus, 2 steps) and a TP=2 x PP=2 run of a hybrid model (4 gloo ranks). Their
checkpoints hold the optimizer state next to the weights; the converter reads the weights only:
megatron-to-hf (exactly the trainer's tensors; the HF model's loss on the trainer's validation
batches is the trainer's validation loss), reshard and verify-hf. The exported tokenizer is a
standard transformers class with our ids; model.safetensors has normal permissions. Then
training starts from the converted weights (checkpoint.init_from: HF export, trainer
checkpoint, the paper's reference weights; TP=1 and TP=2 x PP=2 under bf16), with clear errors
for sources that do not fit.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_on_ranks
from tests.train_capture import run_capturing
from tests.tiny_models import write_tiny_model

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "kla_ref_model.npz"



def _argv(ckpt_dir, *extra):
    return ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--set", f"checkpoint.dir={ckpt_dir}",
            "--set", "train.warmup_steps=0", "--set", "train.eval_interval=0", "--set", "logging.interval=1",
            "--set", "checkpoint.keep_last=0", *extra]


def _tiny_lr(*extra):
    """One step that leaves the weights where they started (Adam moves each by ~lr)."""
    return ("--set", "train.steps=1", "--set", "train.lr=1e-12", "--set", "train.min_lr=0", "--set",
            "train.weight_decay=0", *extra)


def _capture(trainer):
    """The trainer's weights (one rank), validation loss and validation batches (rank 0)."""
    from kla_megatron.training.data import rank_micro_batches

    captured = {}
    if trainer.world == 1:
        captured["state"] = {k: v.detach().float().clone() for k, v in trainer.engine.raw_chunks[0].state_dict().items()
                             if not k.endswith("_extra_state")}
    if trainer.datasets.valid is None:  # built only with train.eval_interval > 0
        return captured
    captured["valid"] = trainer._validate()
    t = trainer.run.train
    captured["valid_batches"] = [
        [{k: b[k].clone() for k in ("tokens", "labels", "loss_mask")}
         for b in rank_micro_batches(trainer.datasets.valid, i * t.global_batch_size, trainer.run,
                                     trainer.dp_rank, trainer.dp)]
        for i in range(t.eval_iters)] if trainer.rank == 0 else None
    return captured


def _runs(rank, world, runs):
    """Training runs through the real entry point, one after another (tests/train_capture.py)."""
    return [{"losses": dict(h.losses), "start": h.start_step, "final": h.final_step, "resumed_from": h.resumed_from,
             "last": h.last_checkpoint, **captured} for h, captured in run_capturing(runs, _capture)]


def _convert(*argv):
    from kla_megatron.checkpoint import cli

    return cli.main([str(a) for a in argv])


def _hf_state(hf_dir):
    from kla_megatron.checkpoint import hf_io

    return hf_io.load_hf(hf_dir)


def _hf_loss(hf_dir, micro_batches_list):
    """Token-mean loss of the HF export over the trainer's validation micro-batches."""
    from kla_megatron.checkpoint import hf_io

    config, state = hf_io.load_hf(hf_dir)
    model = hf_io.hf_model(config, state)
    total = n = 0.0
    with torch.no_grad():
        for micro_batches in micro_batches_list:
            for b in micro_batches:
                logits = model(b["tokens"], use_cache=False).logits.double()
                nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="none")
                mask = b["loss_mask"].flatten().double()
                total += float((nll * mask).sum())
                n += float(mask.sum())
    return total / n


def _megatron_state(ckpt_dir, model_yaml=None):
    from kla_megatron.checkpoint import megatron_io
    from kla_megatron.models import load_model_config

    src = megatron_io.find_dist_checkpoint(ckpt_dir)
    cfg = load_model_config(model_yaml or megatron_io.find_model_config(src))
    return megatron_io.load_megatron_state(src, megatron_io.adapt_vocab(cfg, megatron_io.checkpoint_shapes(src)))


# ---------------------------------------------------------------- the trainer's checkpoints


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The README's main job (configs/tiny_cpu.yaml on the sample corpus), 2 steps."""
    from data_tools.prepare_sample import prepare_sample

    root = tmp_path_factory.mktemp("main_job")
    sample = prepare_sample(str(root / "data"), vocab_size=512)
    ck = root / "checkpoints"
    argv = _argv(ck, "--set", "train.steps=2", "--set", f"data.blend=[{sample['data_prefix']}]",
                 "--set", f"data.tokenizer={sample['tokenizer_model']}")
    (res,) = run_on_ranks(_runs, world_size=1, args=([argv],))[0]
    return {"root": root, "ck": ck, "tokenizer": sample["tokenizer_model"], "jsonl": sample["jsonl"], **res}


@pytest.fixture(scope="module")
def main_hf(main_job):
    out = main_job["root"] / "hf"
    rc = _convert("megatron-to-hf", main_job["ck"], out, "--tokenizer", main_job["tokenizer"], "--verify")
    return rc, out


TP2PP2 = ("--set", "parallel.tensor=2", "--set", "parallel.pipeline=2", "--set", "data.kind=mock",
          "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=4", "--set", "train.seq_length=32")


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory):
    """The hybrid model trained 2 steps at TP=2 x PP=2 (4 ranks, fp32), validated at the end."""
    root = tmp_path_factory.mktemp("tp2pp2")
    model = write_tiny_model(root / "hybrid.yaml", vocab_size=500, num_query_groups=2, position_embedding="rope",
                             tie_embeddings=True)
    argv = _argv(root / "hybrid", *TP2PP2, "--set", f"model={model}", "--set", "train.steps=2",
                 "--set", "train.eval_iters=1", "--set", "train.eval_interval=2")
    (hybrid,) = run_on_ranks(_runs, world_size=4, args=([argv],))[0]
    return {"root": root, "model": model, "hybrid": hybrid}


def test_main_job_checkpoint_converts_to_hf_exactly(main_job, main_hf):
    rc, out = main_hf
    assert rc == 0
    from kla_megatron.checkpoint import names
    from kla_megatron.models import load_model_config

    config, hf = _hf_state(out)
    assert config.vocab_size == 512 and config.layer_pattern == load_model_config("kla_tiny").layer_pattern
    expected = names.megatron_to_hf(main_job["state"], config.layer_pattern)
    assert hf.keys() == expected.keys()
    for key in hf:
        assert torch.equal(hf[key], expected[key]), key
    # the trainer wrote optimizer state too: it was there and was ignored
    from kla_megatron.checkpoint.megatron_io import checkpoint_shapes, find_dist_checkpoint

    assert any(k.startswith("optimizer.") for k in checkpoint_shapes(find_dist_checkpoint(main_job["ck"])))
    # normal permissions: what any file created here gets (0666 minus the umask), not 0600
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_main_job_checkpoint_reshards_and_verifies(main_job, main_hf, tmp_path):
    assert _convert("reshard", main_job["ck"], tmp_path / "tp2", "--tp", "2", "--verify") == 0
    assert _convert("verify-hf", main_job["ck"], main_hf[1]) == 0
    resharded = _megatron_state(tmp_path / "tp2")
    for key, value in main_job["state"].items():
        assert torch.equal(resharded[key], value), key


def test_tp2_pp2_trainer_checkpoint_converts(tp2pp2, tmp_path):
    out = tmp_path / "hf"
    assert _convert("megatron-to-hf", tp2pp2["root"] / "hybrid", out, "--verify") == 0
    config, _ = _hf_state(out)
    assert config.vocab_size == 512 and config.layer_pattern == "K-*-"  # 500 padded by the trainer
    run = tp2pp2["hybrid"]
    assert sorted(run["losses"]) == [1, 2]
    # the HF model computes the trainer's own validation loss (TP=2 x PP=2 pipeline, fp32)
    assert _hf_loss(out, run["valid_batches"]) == pytest.approx(run["valid"], rel=1e-5, abs=0)


# ---------------------------------------------------------------- the tokenizer (item 10)

LOAD_TOKENIZER = r"""
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(open(sys.argv[2]).read())
print(json.dumps({"class": type(tok).__name__, "module": type(tok).__module__,
                  "ids": [tok(t)["input_ids"] for t in texts],
                  "decoded": [tok.decode(tok(t)["input_ids"]) for t in texts],
                  "eos": tok.eos_token_id, "pad": tok.pad_token_id}))
"""


def test_exported_tokenizer_is_a_standard_class_with_our_ids(main_job, main_hf, tmp_path):
    from kla_megatron.checkpoint.hf_tokenizer import PROBES
    from kla_megatron.training.tokenizer import load_tokenizer

    out = main_hf[1]
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in cfg
    ours = load_tokenizer(main_job["tokenizer"])
    docs = [json.loads(line)["text"] for line in open(main_job["jsonl"])][:20]
    texts = [*PROBES, *docs]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", LOAD_TOKENIZER, str(out), str(tmp_path / "texts.json")],
                          cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # transformers 5 reads config.json first: its auto_map (the model's code) makes AutoTokenizer
    # ask about remote code on a terminal; without one it goes on, and the tokenizer needs none
    got = json.loads(proc.stdout[proc.stdout.rfind('{"class"'):].splitlines()[0])
    assert got["module"].startswith("transformers.")  # no custom code
    assert got["ids"] == [ours.tokenize(t) for t in texts]
    assert got["decoded"] == [ours.detokenize(ours.tokenize(t)) for t in texts]
    assert got["decoded"][-len(docs):] == docs  # lossless on real text
    assert got["eos"] == ours.eod


VARIANTS = {  # sentencepiece trainer settings data_tools can produce (BPE) and a few beyond
    "nfkc_extra_spaces": dict(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True),
    "user_symbols": dict(user_defined_symbols=["\n", "<|sep|>", "def"]),
    "no_byte_fallback": dict(byte_fallback=False, character_coverage=0.99),
    "no_dummy_prefix": dict(add_dummy_prefix=False, user_defined_symbols=["\n"]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tokenizer_json_matches_sentencepiece(variant, main_job, tmp_path):
    import random

    import sentencepiece as spm

    from kla_megatron.checkpoint import hf_tokenizer

    docs = [json.loads(line)["text"] for line in open(main_job["jsonl"])]
    kw = dict(model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter("\n".join(docs[:20]).split("\n")),
                                   model_prefix=str(tmp_path / "m"), vocab_size=400, pad_id=3, minloglevel=2,
                                   **{**kw, **VARIANTS[variant]})
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    rng = random.Random(0)
    alphabet = list(" \n\t abcdefXYZ0123456789.,;:!?'\"()[]{}<>/\\-_=+*|éüñß日本語🙂\u200b\u00a0▁ﬁ①") + ["<|sep|>"]
    texts = [*hf_tokenizer.PROBES, *docs[20:40],
             *("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(500))]
    assert hf_tokenizer.mismatch(hf_tokenizer.build_tokenizer(tmp_path / "m.model"), sp, texts) is None


# ---------------------------------------------------------------- checkpoint.init_from


@pytest.fixture(scope="module")
def init_runs(main_job, main_hf, tmp_path_factory):
    """One rank: init from the HF export, from the trainer's checkpoint root, a fresh run; a rerun
    of the first (it resumes its own checkpoint instead); the paper's reference weights."""
    root = tmp_path_factory.mktemp("init_from")
    data = ("--set", f"data.blend=[{main_job['root'] / 'data' / 'sample_text_document'}]",
            "--set", f"data.tokenizer={main_job['tokenizer']}")
    runs = [_argv(root / "from_hf", *data, *_tiny_lr("--set", f"checkpoint.init_from={main_hf[1]}")),
            _argv(root / "from_ckpt", *data, *_tiny_lr("--set", f"checkpoint.init_from={main_job['ck']}")),
            _argv(root / "fresh", *data, *_tiny_lr()),
            _argv(root / "from_hf", *data, "--set", "train.steps=2", "--set", f"checkpoint.init_from={main_hf[1]}")]
    import yaml

    from kla_megatron.checkpoint.reference import reference_config, read_reference_state

    cfg = reference_config(read_reference_state(GOLDEN))
    reference = root / "reference.yaml"
    reference.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    runs.append(_argv(root / "from_ref", "--set", f"model={reference}", "--set", "data.kind=mock",
                      "--set", "train.seq_length=32", *_tiny_lr("--set", f"checkpoint.init_from={GOLDEN}")))
    results = run_on_ranks(_runs, world_size=1, args=(runs,))[0]
    return {"root": root, "runs": results, "reference": reference}


def _close(state, expected, atol):
    assert state.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(state[key], expected[key].float(), rtol=0, atol=atol, msg=key)


def test_init_from_hf_export_and_trainer_checkpoint(main_job, init_runs):
    from_hf, from_ckpt, fresh, rerun = init_runs["runs"][:4]
    for r in (from_hf, from_ckpt):
        assert r["resumed_from"] is None and r["start"] == 0 and r["final"] == 1
        assert r["last"].endswith("iter_0000001")  # a fresh step counter
        _close(r["state"], main_job["state"], atol=1e-6)  # the source's weights (lr ~ 0)
    assert from_hf["losses"][1] == from_ckpt["losses"][1]  # same weights, same data
    assert abs(fresh["losses"][1] - from_hf["losses"][1]) > 0.05  # and not a fresh initialisation
    # the same first batch as the main job's first step, on weights trained 2 steps: a lower loss
    assert from_hf["losses"][1] < main_job["losses"][1]
    # requeued: the run's own checkpoint wins over init_from
    assert rerun["resumed_from"].endswith("iter_0000001") and rerun["start"] == 1 and sorted(rerun["losses"]) == [2]


def test_init_from_reference_weights(init_runs):
    from kla_megatron.checkpoint.reference import from_reference, read_reference_state

    run = init_runs["runs"][4]
    assert run["start"] == 0 and run["final"] == 1
    cfg, expected = from_reference(read_reference_state(GOLDEN))
    state = run["state"]
    vocab = cfg.vocab_size  # 97; the trainer pads the model to 128 rows: the rest keep their init
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert state[key].shape[0] == 128
        torch.testing.assert_close(state[key][:vocab], expected[key].float(), rtol=0, atol=1e-6)
        state = {**state, key: state[key][:vocab]}
    _close(state, expected, atol=1e-6)


def test_init_from_hf_at_tp2_pp2_bf16(main_job, main_hf, tmp_path):
    """The main job's model at TP=2 x PP=2 under bf16, initialised from its HF export and stepped
    once with a negligible lr: the checkpoint it writes holds the source's weights."""
    argv = _argv(tmp_path / "init_bf16", *TP2PP2, *_tiny_lr("--set", "train.precision=bf16",
                                                            "--set", f"checkpoint.init_from={main_hf[1]}"))
    (run,) = run_on_ranks(_runs, world_size=4, args=([argv],))[0]
    assert run["start"] == 0 and run["final"] == 1
    state = _megatron_state(tmp_path / "init_bf16")  # the bf16 checkpoint, read back
    for key, value in main_job["state"].items():  # the source, rounded to bf16 where the model is bf16
        fp32 = key.rsplit(".", 1)[-1] in ("A_log", "delta_raw", "p", "lambda_skip")  # kept fp32 by the mixer
        torch.testing.assert_close(state[key], value if fp32 else value.to(torch.bfloat16).float(),
                                   rtol=0, atol=1e-6, msg=key)


def _load_into_hybrid(hybrid_yaml, src):
    from kla_megatron.checkpoint import init_from, megatron_io, ranks
    from kla_megatron.models import load_model_config

    def body():
        cfg = load_model_config(hybrid_yaml)
        model = megatron_io.build_model(cfg)
        return init_from.load_weights(src, [model], cfg, cfg.vocab_size)

    return ranks.run(body, 1)


def test_init_from_errors_are_one_line(main_job, main_hf, tp2pp2, tmp_path):
    import shutil

    from kla_megatron.training.config import load_run_config

    def config_error(*overrides):
        with pytest.raises(ValueError) as info:
            load_run_config(str(REPO / "configs" / "tiny_cpu.yaml"), list(overrides))
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "does not exist" in config_error(f"checkpoint.init_from={tmp_path / 'nope'}")
    assert "exclude each other" in config_error(f"checkpoint.init_from={main_hf[1]}",
                                                f"checkpoint.resume={main_job['ck']}")
    assert "deepspeed" in config_error(f"checkpoint.init_from={main_hf[1]}", "engine=deepspeed",
                                       "train.nan_policy=abort")

    hybrid = str(tp2pp2["model"])
    cases = {  # source -> what the message must name
        main_hf[1]: [str(main_hf[1] / "config.json"), "layer_pattern 'K-K-' (run: 'K-*-')", "hidden_size 64"],
        main_job["ck"]: ["model_config.yaml", "layer_pattern 'K-K-' (run: 'K-*-')"],
    }
    bare = tmp_path / "bare" / "model"  # the trainer's model/ dir without model_config.yaml: shapes decide
    shutil.copytree(main_job["ck"] / "iter_0000002" / "model", bare)
    cases[bare] = [f"megatron checkpoint {bare} does not match the model config", "different shapes",
                   "decoder.layers.0.mixer.A_log: stored (4, 32, 8) != model (2, 32, 4)", "not stored"]
    not_ref = tmp_path / "weights.pt"
    torch.save({"foo": torch.zeros(2)}, not_ref)
    cases[not_ref] = [str(not_ref), "embedding.weight"]
    for src, needles in cases.items():
        with pytest.raises(ValueError) as info:
            _load_into_hybrid(hybrid, src)
        message = str(info.value)
        assert "\n" not in message and len(message) < 1500, message
        for needle in needles:
            assert needle in message, (needle, message)


def test_main_job_then_conversion_then_hf_generate(main_job, main_hf):
    """The user's path: the README's main job, the documented conversion, then transformers'
    AutoTokenizer + AutoModelForCausalLM + a left-padded batched generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kla_megatron.hf  # noqa: F401  (registers the "kla" model type with the Auto classes)

    out = main_hf[1]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    prompts = ["The module", "A function that returns the list of"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        for row, prompt in enumerate(prompts):
            alone = model.generate(**tok([prompt], return_tensors="pt"), max_new_tokens=8, do_sample=False,
                                   pad_token_id=tok.pad_token_id)
            assert together[row, -8:].tolist() == alone[0, -8:].tolist(), prompt
    assert all(isinstance(t, str) for t in tok.batch_decode(together[:, -8:]))


# ---------------------------------------------------------------- the public one-process API


def _load_with_api(rank, world, ck):
    import kla_megatron

    model = kla_megatron.load_model(ck)
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    by_iteration = kla_megatron.load_model(ck, iteration=2).state_dict()
    try:
        kla_megatron.load_model(ck, iteration=7)
        missing = None
    except FileNotFoundError as exc:
        missing = str(exc)
    return state, {k: torch.equal(state[k], by_iteration[k].float()) for k in state}, model.training, missing


def test_load_model_reads_the_trainers_checkpoint(main_job):
    state, same_by_iteration, training, missing = run_on_ranks(_load_with_api, world_size=1,
                                                               args=(main_job["ck"],))[0]
    assert set(state) == set(main_job["state"])
    for key, value in main_job["state"].items():
        assert torch.equal(state[key], value), key
    assert all(same_by_iteration.values())
    assert training is False
    assert missing is not None and "iteration 7" in missing and "[2]" in missing
