"""kla-eval on the README's main job (2 training steps of configs/tiny_cpu.yaml) and its HF export:
the local tasks in tests/data/eval_tasks (multiple choice, LAMBADA-style, rolling text, short
generation) score the same per example whether the checkpoint is the trainer's directory or the
export, at batch size 1 or 8; one log-likelihood equals a hand computation from the model's
logits; generation with left padding equals each prompt alone and a plain greedy loop; the JSON
and Markdown files are written; bad input is one line and exit status 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_convert_trainer import main_hf, main_job  # noqa: F401  (fixtures: the run and its export)

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tests" / "data" / "eval_tasks"
TASKS = "kla_mc,kla_lambada,kla_text,kla_gen"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository root


def _eval(*argv):
    """kla-eval in this process (the imports are paid once); the environment it sets for quiet
    libraries is undone afterwards."""
    import os

    from kla_megatron.evaluation import cli

    saved = dict(os.environ)
    try:
        return cli.main([str(a) for a in argv])
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _samples(out: Path) -> dict:
    """{task: [filtered response per example, in doc order]}."""
    found = {}
    for path in sorted(out.glob("samples_*.jsonl")):
        rows = sorted((json.loads(line) for line in path.open()), key=lambda r: r["doc_id"])
        found[path.stem[len("samples_"):]] = [r["filtered_resps"] for r in rows]
    return found


def _log_likelihoods(samples: dict) -> list:
    return [float(choice[0]) for task in ("kla_mc", "kla_lambada") for resp in samples[task] for choice in resp] + \
        [float(resp[0]) for resp in samples["kla_text"]]


@pytest.fixture(scope="module")
def scored(main_job, main_hf, tmp_path_factory):  # noqa: F811
    """The trainer's directory at batch size 8, its HF export at batch sizes 1 and 8."""
    root = tmp_path_factory.mktemp("eval")
    runs = {"trainer_bs8": (main_job["ck"], 8, "--tokenizer", main_job["tokenizer"]),
            "hf_bs1": (main_hf[1], 1), "hf_bs8": (main_hf[1], 8)}
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.chdir(REPO)
        for name, (src, bs, *extra) in runs.items():
            rc = _eval(src, "--tasks", TASKS, "--include-path", TASKS_DIR, "--batch-size", bs, "--device", "cpu",
                       "--output", root / name, "--log-samples", *extra)
            out[name] = {"rc": rc, "dir": root / name}
    return out


def test_trainer_dir_and_hf_export_score_alike_at_batch_1_and_8(scored):
    assert {name: run["rc"] for name, run in scored.items()} == {"trainer_bs8": 0, "hf_bs1": 0, "hf_bs8": 0}
    samples = {name: _samples(run["dir"]) for name, run in scored.items()}
    assert sorted(samples["hf_bs1"]) == sorted(TASKS.split(","))
    assert [len(samples["hf_bs1"][t]) for t in ("kla_mc", "kla_lambada", "kla_text", "kla_gen")] == [10, 8, 4, 4]
    reference = _log_likelihoods(samples["hf_bs1"])
    assert len(reference) == 10 * 4 + 8 + 4
    for name in ("hf_bs8", "trainer_bs8"):
        got = _log_likelihoods(samples[name])
        worst = max(abs(a - b) for a, b in zip(got, reference))
        assert worst <= 1e-4, f"{name}: per-example log-likelihood differs by {worst:.2e}"
        assert samples[name]["kla_gen"] == samples["hf_bs1"]["kla_gen"], name
        assert [r[0][1] for r in samples[name]["kla_lambada"]] == [r[0][1] for r in samples["hf_bs1"]["kla_lambada"]]
    results = {name: json.loads((run["dir"] / "results.json").read_text())["results"] for name, run in scored.items()}
    for task in ("kla_mc", "kla_lambada"):
        assert results["trainer_bs8"][task]["acc,none"] == results["hf_bs1"][task]["acc,none"]


def test_results_json_and_markdown(scored, main_job):  # noqa: F811
    out = scored["trainer_bs8"]["dir"]
    data = json.loads((out / "results.json").read_text())
    meta = data["kla_eval"]
    assert meta["kind"] == "trainer" and meta["iteration"] == 2 and meta["batch_size"] == 8
    assert meta["checkpoint"] == str(Path(main_job["ck"]).resolve()) and meta["read"].endswith("iter_0000002/model")
    assert meta["tasks"] == TASKS.split(",") and meta["device"] == "cpu" and meta["dtype"] == "fp32"
    assert meta["tokenizer"] == str(main_job["tokenizer"])
    assert set(data["results"]) == set(TASKS.split(","))
    lam = data["results"]["kla_lambada"]
    assert lam["perplexity,none"] > 1 and 0 <= lam["acc,none"] <= 1
    # perplexity is exp of the mean negative log-likelihood of the last words
    lls = [r[0][0] for r in _samples(out)["kla_lambada"]]
    assert lam["perplexity,none"] == pytest.approx(float(torch.tensor(lls, dtype=torch.float64).neg().mean().exp()),
                                                   rel=1e-9)
    md = (out / "results.md").read_text()
    assert "| task | metric | value | stderr |" in md and "iteration 2" in md
    rows = [line for line in md.splitlines() if line.startswith("| kla_")]
    assert {r.split("|")[1].strip() for r in rows} == set(TASKS.split(","))
    mc_acc = next(r for r in rows if r.startswith("| kla_mc | acc |"))
    assert mc_acc.split("|")[3].strip() == f"{data['results']['kla_mc']['acc,none']:.4f}"
    assert (scored["hf_bs1"]["dir"] / "results.json").exists()
    assert json.loads((scored["hf_bs1"]["dir"] / "results.json").read_text())["kla_eval"]["iteration"] is None


def test_named_iteration(scored, main_job, tmp_path):  # noqa: F811
    assert _eval(main_job["ck"], "--iteration", 2, "--tasks", "kla_lamb*", "--include-path", TASKS_DIR, "--limit", 3,
                 "--tokenizer", main_job["tokenizer"], "--output", tmp_path, "--log-samples", "--device", "cpu") == 0
    meta = json.loads((tmp_path / "results.json").read_text())["kla_eval"]
    assert meta["iteration"] == 2 and meta["tasks"] == ["kla_lambada"] and meta["limit"] == 3  # the pattern expanded
    got = _samples(tmp_path)["kla_lambada"]
    assert got == _samples(scored["trainer_bs8"]["dir"])["kla_lambada"][:3]


def _hf(main_hf):  # noqa: F811
    from kla_megatron.checkpoint import hf_io
    from kla_megatron.evaluation.loading import hf_tokenizer

    config, state = hf_io.load_hf(main_hf[1])
    return hf_io.hf_model(config, state), hf_tokenizer(main_hf[1])


def test_loglikelihood_equals_hand_computation(scored, main_hf, main_job):  # noqa: F811
    """The first LAMBADA-style example: log p(last word | passage) from the full forward's
    logits (float64 log-softmax over the whole vocabulary), against kla-eval's number."""
    from kla_megatron.training.tokenizer import load_tokenizer

    model, _ = _hf(main_hf)
    sp = load_tokenizer(main_job["tokenizer"])
    text = json.loads((TASKS_DIR / "kla_lambada.jsonl").read_text().splitlines()[0])["text"]
    context, word = text.rsplit(" ", 1)
    whole = sp.tokenize(context + " " + word)
    n_ctx = len(sp.tokenize(context))
    assert whole[:n_ctx] == sp.tokenize(context) and len(whole) > n_ctx
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]), use_cache=False).logits[0].double()
    logp = logits.log_softmax(-1)
    expected = sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))
    got = _samples(scored["hf_bs8"]["dir"])["kla_lambada"][0][0][0]
    assert got == pytest.approx(expected, abs=1e-4)
    assert _samples(scored["trainer_bs8"]["dir"])["kla_lambada"][0][0][0] == pytest.approx(expected, abs=1e-4)


def test_generation_left_padded_equals_each_prompt_and_greedy_loop(main_hf):  # noqa: F811
    from kla_megatron.evaluation.lm import KLAEvalLM
    from kla_megatron.hf import KLAForCausalLM

    trained, tok = _hf(main_hf)
    config = trained.config
    config.initializer_range = 0.3  # random weights this large make every token depend on the whole prompt
    torch.manual_seed(0)
    model = KLAForCausalLM(config).eval()
    lm = KLAEvalLM(model, tok, batch_size=3)
    prompts = ["The river", "A good cup of tea needs fresh water and", "Question: What do bees make?\nAnswer:"]
    batched = lm.generate_texts(prompts, [], 6)
    alone = [lm.generate_texts([p], [], 6)[0] for p in prompts]
    assert batched == alone
    for prompt, text in zip(prompts, alone):
        ids = tok.encode(prompt)
        for _ in range(6):  # greedy, no cache, no padding
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
        assert text == tok.decode(ids[len(tok.encode(prompt)):]), prompt
    # a stop string: the text before its first occurrence
    first = max(alone, key=len)
    assert len(first) > 1
    stop = first[len(first) // 2:]
    assert lm.generate_texts([prompts[alone.index(first)]], [stop], 6) == [first[: first.find(stop)]]


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("kla-eval: error: "), err
    return err[0]


def test_bad_input_is_one_line(tmp_path, main_job, main_hf, capsys):  # noqa: F811
    common = ("--tasks", "kla_mc", "--include-path", TASKS_DIR, "--output", tmp_path / "out", "--device", "cpu")
    msg = _one_line_error(capsys, _eval(tmp_path / "missing", *common))
    assert "does not exist" in msg and "missing" in msg
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a checkpoint")
    msg = _one_line_error(capsys, _eval(tmp_path / "empty", *common, "--tokenizer", main_job["tokenizer"]))
    assert "is not a megatron dist checkpoint" in msg
    msg = _one_line_error(capsys, _eval(tmp_path / "empty" / "notes.txt", *common))
    assert "not reference weights" in msg
    msg = _one_line_error(capsys, _eval(main_job["ck"], *common))  # a trainer checkpoint holds no tokenizer
    assert "--tokenizer" in msg
    msg = _one_line_error(capsys, _eval(main_job["ck"], *common, "--tokenizer", main_job["tokenizer"],
                                        "--iteration", "7"))
    assert "no checkpoint of iteration 7" in msg and "(iterations there: [2])" in msg
    msg = _one_line_error(capsys, _eval(main_job["ck"], "--tasks", "kla_mcq", "--include-path", TASKS_DIR,
                                        "--output", tmp_path / "out", "--tokenizer", main_job["tokenizer"]))
    assert "unknown task 'kla_mcq'" in msg and "kla_mc" in msg
    msg = _one_line_error(capsys, _eval(main_job["ck"], *common[:2], "--include-path", tmp_path / "nowhere",
                                        "--output", tmp_path / "out"))
    assert "is not a directory" in msg
    import shutil

    bare = tmp_path / "hf_no_tokenizer"  # an export written without --tokenizer
    shutil.copytree(main_hf[1], bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    msg = _one_line_error(capsys, _eval(bare, *common))
    assert "has no tokenizer files" in msg and "--tokenizer" in msg
    (tmp_path / "a_file").write_text("")
    msg = _one_line_error(capsys, _eval(main_hf[1], *common[:4], "--output", tmp_path / "a_file" / "out"))
    assert "cannot create or write files in" in msg and "a_file" in msg
    msg = _one_line_error(capsys, _eval(main_hf[1], *common[:4], "--output", tmp_path / "a_file"))
    assert "is a file, not a directory" in msg
    golden = REPO / "tests" / "golden" / "kla_ref_model.npz"  # reference weights: 97 ids, our tokenizer has 512
    msg = _one_line_error(capsys, _eval(golden, *common, "--tokenizer", main_job["tokenizer"]))
    assert "does not fit the model" in msg and "97" in msg
    assert not (tmp_path / "out").exists()


def test_reference_weights_score_as_their_export(main_job, tmp_path):  # noqa: F811
    """The paper's reference weights (the golden .npz, 97 ids) score as their kla-convert
    reference-to-hf export, with a character tokenizer small enough for the vocabulary."""
    import sentencepiece as spm

    from kla_megatron.checkpoint import cli as convert

    texts = [json.loads(line)["text"] for line in open(main_job["jsonl"])][:30]
    spm.SentencePieceTrainer.train(sentence_iterator=iter("\n".join(texts).split("\n")),
                                   model_prefix=str(tmp_path / "chars"), vocab_size=90, model_type="char",
                                   character_coverage=0.98, minloglevel=2)
    golden = REPO / "tests" / "golden" / "kla_ref_model.npz"
    assert convert.main(["reference-to-hf", str(golden), str(tmp_path / "hf")]) == 0
    common = ("--tasks", "kla_mc,kla_lambada", "--include-path", TASKS_DIR, "--tokenizer", tmp_path / "chars.model",
              "--batch-size", 4, "--log-samples", "--device", "cpu")
    assert _eval(golden, *common, "--output", tmp_path / "ref") == 0
    assert _eval(tmp_path / "hf", *common, "--output", tmp_path / "exported") == 0
    assert json.loads((tmp_path / "ref" / "results.json").read_text())["kla_eval"]["kind"] == "reference"
    ref, exported = _samples(tmp_path / "ref"), _samples(tmp_path / "exported")
    assert len(ref["kla_mc"]) == 10 and ref == exported


@pytest.mark.gpu
def test_cuda_scores_match_cpu(scored, main_hf, tmp_path):  # noqa: F811
    """On a GPU (Triton kernels, fp32 weights) the per-example log-likelihoods are the CPU's up to
    kernel rounding."""
    assert _eval(main_hf[1], "--tasks", TASKS, "--include-path", TASKS_DIR, "--batch-size", 8, "--device", "cuda",
                 "--output", tmp_path, "--log-samples") == 0
    gpu, cpu = _log_likelihoods(_samples(tmp_path)), _log_likelihoods(_samples(scored["hf_bs1"]["dir"]))
    assert max(abs(a - b) / (1 + abs(b)) for a, b in zip(gpu, cpu)) < 1e-3


def test_console_script_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kla_megatron.evaluation.cli", str(tmp_path / "nope"), "--tasks",
                           "kla_mc", "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"kla-eval: error: checkpoint {tmp_path / 'nope'} does not exist"]


def test_eval_checkpoints_sbatch_scores_each_iteration_once(tmp_path):
    """launch/slurm/eval_checkpoints.sbatch (kla-eval stood in for by a script that records its
    arguments): one kla-eval per complete iter_N of the run, an iteration with results.json is
    skipped, the scores gathered in summary.md."""
    import os

    ck = tmp_path / "checkpoints"
    for name in ("iter_0000001", "iter_0000002", "iter_0000003.tmp"):
        (ck / name).mkdir(parents=True)
        (ck / name / "manifest.json").write_text("{}")
    (ck / "iter_0000003").mkdir()  # no manifest.json: incomplete
    out = tmp_path / "eval"
    (out / "iter_0000001").mkdir(parents=True)
    (out / "iter_0000001" / "results.json").write_text("{}")
    (out / "iter_0000001" / "results.md").write_text("| kla_mc | acc | 0.5 | 0.1 |\n")
    fake = tmp_path / "fake-kla-eval"  # records its arguments, writes what kla-eval writes
    fake.write_text('#!/bin/bash\necho "$@" >> "$(dirname "$0")/calls"\nwhile [ "$1" != --output ]; do shift; done\n'
                    'mkdir -p "$2" && echo "{}" > "$2/results.json" && echo "| kla_mc | acc | 0.7 | 0.1 |" '
                    '> "$2/results.md"\n')
    fake.chmod(0o755)
    script = REPO / "launch" / "slurm" / "eval_checkpoints.sbatch"
    env = {**os.environ, "EVAL_OUT": str(out), "KLA_EVAL": str(fake), "KLA_REPO": str(REPO)}
    proc = subprocess.run(["bash", str(script), str(ck), "--tasks", "kla_mc", "--batch-size", "4"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"{ck} --iteration 2 --output {out / 'iter_0000002'} --tasks kla_mc --batch-size 4"]
    assert "skip iter_0000001: scored already" in proc.stdout and "skip iter_0000003: incomplete" in proc.stdout
    summary = (out / "summary.md").read_text()
    assert summary.index("## iter_0000001") < summary.index("0.5") < summary.index("## iter_0000002") < \
        summary.index("0.7")
    again = subprocess.run(["bash", str(script), str(ck), "--tasks", "kla_mc"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and len((tmp_path / "calls").read_text().splitlines()) == 1
    dry = subprocess.run(["bash", str(script), str(ck), "--tasks", "kla_mc"], capture_output=True, text=True,
                         timeout=60, env={**env, "DRY_RUN": "1", "EVAL_OUT": str(tmp_path / "fresh")})
    assert dry.returncode == 0 and dry.stdout.count("would run: ") == 2
    bad = subprocess.run(["bash", str(script), str(ck), "--iteration", "2"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "set per checkpoint" in bad.stderr
