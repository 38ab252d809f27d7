"""The data command lines and the scan demo, run for real (subprocesses) with their outputs
checked: ``prepare_sample``, ``kla-train-tokenizer``, ``kla-preprocess`` with each input option
(``.gz``, ``--text-mode file``, ``--json-key``, ``--input-format``), ``kla-data merge`` and
``kla-data inspect``, ``kla-scan-demo``."""
import gzip
import json
import os
import re
import subprocess
import sys

import pytest

from tests.test_data_tools import _read_docs


def _cli(*argv, ok=True):
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, f"{argv}: {proc.stderr[-3000:]}"
    return proc


def _sp(model):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """``python -m data_tools.prepare_sample``: corpus, tokenizer and dataset in one folder."""
    out = tmp_path_factory.mktemp("sample")
    proc = _cli(sys.executable, "-m", "data_tools.prepare_sample", "--out", str(out), "--vocab-size", "512")
    return out, json.loads(proc.stdout), proc


def _preprocess(model, prefix, *inputs, extra=()):
    _cli("kla-preprocess", "--input", *map(str, inputs), "--tokenizer", str(model), "--output-prefix", str(prefix),
         "--no-progress", *extra)


def test_prepare_sample_builds_corpus_tokenizer_and_dataset(sample):
    out, summary, _ = sample
    texts = [json.loads(line)["text"] for line in open(out / "sample.jsonl")]
    sp = _sp(out / "tokenizer.model")
    assert sp.get_piece_size() == summary["vocab_size"] == 512 and summary["eod"] == sp.eos_id()
    docs = _read_docs(summary["data_prefix"])
    assert summary["documents"] == len(docs) == len(texts)
    assert summary["tokens"] == sum(len(seq) for doc in docs for seq in doc)
    for doc, text in zip(docs[:5], texts):
        assert doc == [sp.encode(text) + [sp.eos_id()]]
    # a second run finds the folder up to date: same summary, nothing rewritten
    before = os.path.getmtime(summary["data_prefix"] + ".bin")
    again = _cli(sys.executable, "-m", "data_tools.prepare_sample", "--out", str(out), "--vocab-size", "512")
    assert json.loads(again.stdout) == summary and os.path.getmtime(summary["data_prefix"] + ".bin") == before


def test_train_tokenizer_command(sample, tmp_path):
    out, _, _ = sample
    _cli("kla-train-tokenizer", "--input", str(out / "sample.jsonl"), "--output-prefix", str(tmp_path / "tok"),
         "--vocab-size", "400", "--max-documents", "30", "--num-threads", "1")
    sp = _sp(tmp_path / "tok.model")
    desc = json.loads((tmp_path / "tok.json").read_text())
    assert sp.get_piece_size() == desc["vocab_size"] == 400 and desc["model_type"] == "bpe"
    assert desc["special_tokens"]["eod"]["id"] == sp.eos_id() == 2
    assert (tmp_path / "tok.vocab").read_text().startswith("<unk>\t0\n<s>\t0\n</s>\t0\n<pad>\t0\n")
    text = "Lossless: tabs\tand  spaces\nstay."
    assert sp.decode(sp.encode(text)) == text  # identity normalisation, byte fallback


def test_preprocess_gzipped_jsonl(sample, tmp_path):
    model = sample[0] / "tokenizer.model"
    texts = ["a gzipped document", "and a second one", "third"]
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    _preprocess(model, tmp_path / "gz", path)
    sp = _sp(model)
    assert _read_docs(str(tmp_path / "gz_text_document")) == [[sp.encode(t) + [sp.eos_id()]] for t in texts]


def test_preprocess_text_mode_file(sample, tmp_path):
    model = sample[0] / "tokenizer.model"
    files = {"a.txt": "First line.\nSecond line.\n\nAfter a blank line.\n", "b.txt": "Only one line, no newline."}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    _preprocess(model, tmp_path / "f", tmp_path / "a.txt", tmp_path / "b.txt", extra=("--text-mode", "file"))
    sp = _sp(model)
    # one document per file, holding the whole file verbatim
    assert _read_docs(str(tmp_path / "f_text_document")) == [[sp.encode(t) + [sp.eos_id()]] for t in files.values()]


def test_preprocess_json_key(sample, tmp_path):
    model = sample[0] / "tokenizer.model"
    rows = [{"text": "not this", "body": "the body text"}, {"text": "nor this", "body": "another body"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _preprocess(model, tmp_path / "k", tmp_path / "in.jsonl", extra=("--json-key", "body"))
    sp = _sp(model)
    assert _read_docs(str(tmp_path / "k_body_document")) == [[sp.encode(r["body"]) + [sp.eos_id()]] for r in rows]


def test_preprocess_input_format_overrides_the_extension(sample, tmp_path):
    model = sample[0] / "tokenizer.model"
    lines = [json.dumps({"text": "json in a .txt file"}), json.dumps({"text": "second record"})]
    (tmp_path / "notes.txt").write_text("\n".join(lines) + "\n")
    sp = _sp(model)
    _preprocess(model, tmp_path / "as_json", tmp_path / "notes.txt", extra=("--input-format", "jsonl"))
    assert _read_docs(str(tmp_path / "as_json_text_document")) == [
        [sp.encode(json.loads(line)["text"]) + [sp.eos_id()]] for line in lines]
    _preprocess(model, tmp_path / "as_text", tmp_path / "notes.txt")  # auto: .txt is text, one line a document
    assert _read_docs(str(tmp_path / "as_text_text_document")) == [[sp.encode(line) + [sp.eos_id()]] for line in lines]


def test_data_merge_and_inspect_commands(sample, tmp_path):
    out, summary, _ = sample
    model = out / "tokenizer.model"
    (tmp_path / "b.txt").write_text("one more\nand the last\n")
    _preprocess(model, tmp_path / "b", tmp_path / "b.txt")
    a, b, merged = summary["data_prefix"], str(tmp_path / "b_text_document"), str(tmp_path / "m")
    _cli("kla-data", "merge", "--input", a, b + ".idx", "--output-prefix", merged)
    docs = _read_docs(merged)
    assert docs == _read_docs(a) + _read_docs(b)
    again = _cli("kla-data", "merge", "--input", a, "--output-prefix", merged, ok=False)
    errors = [line for line in again.stderr.splitlines() if line.strip()]
    assert again.returncode != 0 and "already exists" in again.stderr and "Traceback" not in again.stderr, errors

    tokens = sum(len(seq) for doc in docs for seq in doc)
    info = json.loads(_cli("kla-data", "inspect", merged, "--tokenizer", str(model), "--samples", "2",
                           "--json").stdout)
    assert info["documents"] == len(docs) == summary["documents"] + 2 and info["tokens"] == tokens
    assert info["eod_count"] == len(docs) and info["ids_outside_vocab"] == 0 and len(info["samples"]) == 2


def test_scan_demo_command():
    proc = _cli("kla-scan-demo", "--length", "48", "--heads", "2")
    lines = proc.stdout.splitlines()
    assert lines[-1] == "OK", proc.stdout
    scan = re.search(r"scan B=2 L=48 H=2 P=16 S=8: .* relative error of y ([\d.e+-]+)", proc.stdout)
    decode = re.search(r"decode: 48 one-token steps reproduce the scan's last output to ([\d.e+-]+)", proc.stdout)
    assert scan and decode and float(scan[1]) < 1e-5 and float(decode[1]) < 1e-5, proc.stdout
    assert "packed: 2 documents in one row -> final states (2, 2, 16, 8)" in proc.stdout
