"""data_tools: tokenizer training, preprocess -> indexed dataset, merge/inspect, bad input,
crash safety, and the megatron-core GPTDataset reading our output."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_tools.inputs import BadInputError
from data_tools.preprocess import PreprocessConfig, preprocess
from data_tools.sample_corpus import sample_documents, write_sample_corpus
from data_tools.train_tokenizer import TokenizerConfig, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_SYMBOLS = ["<|user|>", "<|endoftext|>"]

ROUND_TRIP_TEXTS = [
    pytest.param("The quick brown fox jumps over the lazy dog.", id="ascii"),
    pytest.param("Ünïcödé: naïve café, Straße, Ελληνικά, русский, 東京都, 한국어, 🙂🚀 👩‍👩‍👧", id="unicode"),
    pytest.param("  leading, trailing  \t\t and   runs    of     spaces   ", id="whitespace-runs"),
    pytest.param("line one\n\n\nline four\r\nwindows\rold-mac\n", id="newlines"),
    pytest.param("def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n\tif x:\n\t\tpass\n", id="code"),
    pytest.param("\u00a0nbsp\u2009thin\u200bzero-width\ufeffbom ﬁ ligature Ⅻ ①", id="nfkc-sensitive"),
    pytest.param(" x", id="leading-space"),
    pytest.param("<|user|> hi<|endoftext|>", id="user-symbols"),
    pytest.param("", id="empty"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Sample JSONL + a small BPE tokenizer trained on it (about a second)."""
    d = tmp_path_factory.mktemp("corpus")
    jsonl = write_sample_corpus(str(d / "sample.jsonl"))
    desc = train_tokenizer(TokenizerConfig(inputs=[jsonl], output_prefix=str(d / "tok"), vocab_size=1024,
                                           user_defined_symbols=USER_SYMBOLS, num_threads=1))
    return {"dir": d, "jsonl": jsonl, "model": str(d / "tok.model"), "desc": desc}


def _sp(model):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=model)


def _run(cfg_kwargs, **over) -> "object":
    return preprocess(PreprocessConfig(**{"progress": False, **cfg_kwargs, **over}))


def _read_docs(prefix):
    """Documents of an indexed dataset as lists of sequences (lists of ids)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    di = ds.document_indices
    return [[ds[s].tolist() for s in range(di[d], di[d + 1])] for d in range(len(di) - 1)]


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trip(corpus, text):
    from kla_megatron.training.tokenizer import load_tokenizer

    sp, tok = _sp(corpus["model"]), load_tokenizer(corpus["model"])
    assert sp.decode(sp.encode(text)) == text
    ids = tok.tokenize(text)
    assert tok.detokenize(np.asarray(ids)) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_tokenizer_special_tokens_and_description(corpus):
    from kla_megatron.training.tokenizer import load_tokenizer

    tok = load_tokenizer(corpus["model"])
    sp = _sp(corpus["model"])
    assert (tok.unk, tok.bos, tok.eos, tok.pad, tok.eod) == (0, 1, 2, 3, 2)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tok.vocab_size == 1024 and len(tok.vocab) == 1024 and tok.inv_vocab[2] == "</s>"
    for sym in USER_SYMBOLS + ["\n"]:
        ids = sp.encode(sym)
        assert [sp.id_to_piece(i) for i in ids if sp.id_to_piece(i) != "▁"] == [sym]
    desc = json.load(open(corpus["dir"] / "tok.json"))
    assert desc == corpus["desc"]
    assert desc["special_tokens"]["eod"] == {"id": 2, "piece": "</s>"}
    assert desc["lossless"] and desc["normalization"] == "identity"
    assert desc["round_trip_check"] == {"documents": len(sample_documents()), "mismatches": 0}
    assert desc["training_data"]["documents"] == len(sample_documents())
    # The adapter pickles (data loader workers) and names its model in the dataset cache key.
    import pickle

    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.tokenize("hello there") == tok.tokenize("hello there")
    assert tok.unique_identifiers["tokenizer_path"] == corpus["model"]
    with pytest.raises(NotImplementedError, match="CLS"):
        tok.cls


def test_tokenizer_sampling_pad_off_and_lossy_on_request(corpus, tmp_path):
    desc = train_tokenizer(TokenizerConfig(inputs=[corpus["jsonl"]], output_prefix=str(tmp_path / "t"),
                                           vocab_size=600, max_sentences=500, pad_id=-1,
                                           normalization="nfkc", num_threads=1))
    td = desc["training_data"]
    assert td["sentences_sampled"] == 500 < td["sentences_seen"]
    assert desc["special_tokens"]["pad"] is None and not desc["lossless"]
    sp = _sp(str(tmp_path / "t.model"))
    assert sp.decode(sp.encode("ﬁ Ⅻ")) != "ﬁ Ⅻ"  # NFKC folds these: lossy, as asked
    from kla_megatron.training.tokenizer import load_tokenizer

    with pytest.raises(ValueError, match="no pad piece"):
        load_tokenizer(str(tmp_path / "t.model")).pad
    with pytest.raises(ValueError, match="already exists"):
        train_tokenizer(TokenizerConfig(inputs=[corpus["jsonl"]], output_prefix=str(tmp_path / "t"), vocab_size=600))
    with pytest.raises(ValueError, match="lower --vocab-size"):
        train_tokenizer(TokenizerConfig(inputs=[corpus["jsonl"]], output_prefix=str(tmp_path / "big"),
                                        vocab_size=60000, num_threads=1))
    assert not glob.glob(str(tmp_path / "big*")) and not glob.glob(str(tmp_path / ".tok-partial-*"))


def _fast_encoders(model):
    from data_tools.cached_encode import CachedEncoder
    from data_tools.tiktoken_encode import TiktokenEncoder

    return [CachedEncoder(model), TiktokenEncoder(model)]


def test_fast_encoders_match_sentencepiece(corpus, tmp_path):
    """Both fast encoders used by preprocess (tiktoken's BPE, the segment cache) give
    sentencepiece's ids exactly; models they cannot reproduce are refused with a reason."""
    import random

    from data_tools.cached_encode import CachedEncoder
    from data_tools.tiktoken_encode import TiktokenEncoder, load_encoder

    rng = random.Random(0)
    alphabet = list("ab c  \n\t\r.,;:!?'\"😀東京ü\u00a0\u3000 0123") + ["the", "  ", "\n\n", "<|user|>", "def", "    "]
    texts = [p.values[0] for p in ROUND_TRIP_TEXTS] + [t for _, t in sample_documents()[:20]]
    texts += ["".join(rng.choices(alphabet, k=rng.randint(0, 50))) for _ in range(3000)]
    want = _sp(corpus["model"]).encode(texts, out_type=int)
    for enc in _fast_encoders(corpus["model"]):
        for _ in range(2):  # cold and warm cache
            assert [enc.encode(t) for t in texts] == want, enc.engine
    assert load_encoder(corpus["model"])[1] == "tiktoken"
    uni = train_tokenizer(TokenizerConfig(inputs=[corpus["jsonl"]], output_prefix=str(tmp_path / "u"),
                                          model_type="unigram", vocab_size=800, num_threads=1, max_sentences=3000))
    assert uni["model_type"] == "unigram"
    # a lossy model: neither fast path
    train_tokenizer(TokenizerConfig(inputs=[corpus["jsonl"]], output_prefix=str(tmp_path / "n"), vocab_size=600,
                                    normalization="nmt_nfkc", num_threads=1))
    for model in (str(tmp_path / "u.model"), str(tmp_path / "n.model")):
        enc, engine = load_encoder(model)
        assert engine.startswith("sentencepiece (tiktoken not used: ") and not enc.enabled, engine
        assert [enc.encode(t) for t in texts[:300]] == enc.sp.encode(texts[:300], out_type=int)
        with pytest.raises(ValueError, match="not a lossless whitespace-split BPE"):
            TiktokenEncoder(model)
    assert CachedEncoder(corpus["model"]).enabled


def _edited_model(src, dst, edit):
    from data_tools.cached_encode import read_model_proto

    proto = read_model_proto(src)
    edit(proto)
    with open(dst, "wb") as f:
        f.write(proto.SerializeToString())
    return str(dst)


def test_tiktoken_encoder_refuses_models_it_cannot_reproduce(corpus, tmp_path):
    """Each condition of the exactness argument is checked, and the segment cache takes over."""
    from data_tools.tiktoken_encode import TiktokenEncoder, load_encoder

    def tied_scores(proto):
        multi = [p for p in proto.pieces if p.type == p.NORMAL and len(p.piece) > 1]
        multi[5].score = multi[4].score

    def unreachable_piece(proto):  # no pair of pieces forms it: its text encodes as 6 characters
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = "qqqzzz", -1e6, piece.NORMAL

    def unknown_character(proto):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = "\u2603x", -1e6, piece.NORMAL

    train_tokenizer(TokenizerConfig(inputs=[corpus["jsonl"]], output_prefix=str(tmp_path / "nb"), vocab_size=600,
                                    byte_fallback=False, num_threads=1))
    cases = {"share a score": tied_scores, "does not encode to that piece": unreachable_piece,
             "not itself a piece": unknown_character}
    models = {reason: _edited_model(corpus["model"], tmp_path / f"m{i}.model", edit)
              for i, (reason, edit) in enumerate(cases.items())}
    models["no byte fallback"] = str(tmp_path / "nb.model")
    for reason, model in models.items():
        with pytest.raises(ValueError, match=reason):
            TiktokenEncoder(model)
        enc, engine = load_encoder(model)
        assert engine.startswith("segment-cache (tiktoken not used:") and reason in engine, engine


TRICKY_TEXTS = [
    "self.assertEqual(x1, foo_bar[2:]) # __init__ 0x1F 3.14e-5 1,000,000",
    "    \tindented\t\ttabs  \r\n  \n\n   trailing   ",
    "ca\u0301fe\u0301 e\u0301\u0302 na\u00efve \u0928\u092e\u0938\u094d\u0924\u0947 \u0645\u0631\u062d\u0628\u0627",
    "\u201cquoted.\u201d \u2014 dash\u2026 \u00ab\u00bb (\u00a9 2024) \u00bd\u00b2 \u0661\u0662\u0663",
    "\U0001F469\u200d\U0001F469\u200d\U0001F467 \u2764\ufe0f \U0001F9EA\U0001D54F \ua66e \u4e00\u4e8c\u4e09abc123",
    "literal \u2581 lower-eighth \u2581\u2581x y\u2581 and <|user|>x<|endoftext|>1",
    "\x00nul \x7f del \x1b[0m \u00a0nbsp\u3000ideo \u2028sep",
    " leading space",
    "  two leading",
    "trailing newline\n",
]


def test_fast_encoders_exact_on_tricky_text(corpus, monkeypatch):
    """The cut of the text and both fast encoders: never inside a piece, ids equal to sentencepiece's.

    Checked on text built to sit on class boundaries (digits, "_", quotes, combining
    marks, emoji sequences, characters outside the vocabulary, a literal "\u2581", user
    symbols, control characters), cold and warm, and with a segment cache so small that it
    is cleared between batches.
    """
    import random

    import data_tools.cached_encode as ce

    enc = ce.CachedEncoder(corpus["model"])
    assert enc.enabled and enc._fine is not None  # the fine path is what is tested here
    for p in ce.read_model_proto(corpus["model"]).pieces:  # the property the exactness argument rests on
        if p.type == p.NORMAL:
            text = p.piece.replace("\u2581", " ")
            assert enc._fine.findall(text) == [text], p.piece
    rng = random.Random(1)
    chars = "".join(TRICKY_TEXTS) + "".join(t for _, t in sample_documents()[:5])
    texts = TRICKY_TEXTS + ["".join(rng.choices(chars, k=rng.randint(0, 80))) for _ in range(3000)]
    texts += [chars[i:i + rng.randint(1, 400)] for i in range(0, len(chars), 97)]
    # long runs of one class: pre-tokens thousands of bytes long (exact, and fast: 100k in ~30 ms)
    texts += ["".join(rng.choices("aeb", k=3000)), "=" * 20000, "ab" * 5000, " " * 300 + "x"]
    want = enc.sp.encode(texts, out_type=int)
    for fast in _fast_encoders(corpus["model"]):
        for _ in range(2):  # cold and warm cache
            tokens, lengths = fast.encode_flat(texts)
            assert lengths.tolist() == [len(w) for w in want], fast.engine
            assert tokens.tolist() == [i for w in want for i in w], fast.engine
        assert fast.encode_flat([])[0].size == 0 and fast.encode_batch(["", "", "a"]) == [[], [], enc.sp.encode("a")]
        with pytest.raises((ValueError, TypeError)):  # no UTF-8 form: refused, not replaced
            fast.encode("a\ud800b")
    monkeypatch.setattr(ce, "_CACHE_LIMIT", 40)
    small = ce.CachedEncoder(corpus["model"])
    assert [small.encode_batch(texts[i:i + 7]) for i in range(0, len(texts), 7)] == \
        [want[i:i + 7] for i in range(0, len(texts), 7)]


def test_fine_pattern_joins_classes_that_share_a_piece():
    from data_tools.cached_encode import _fine_pattern

    p = _fine_pattern(["ab", "\u2581ab", "((", "1"])
    assert p.findall(" ab(c12 \u00e9\u00e8t\u201d.") == [" ab", "(", "c", "1", "2", " \u00e9\u00e8", "t", "\u201d", "."]
    # a piece "a(" joins letters and ASCII punctuation; "12" lets digits run together
    assert _fine_pattern(["a(", "12"]).findall("x(y)12z") == ["x(y)", "12", "z"]
    # a space inside a piece (after its start): no finer split at all
    assert _fine_pattern(["a\u2581b"]) is None


# ---------------------------------------------------------------- preprocess


def test_preprocess_reads_back_exact_ids_with_eod(corpus, tmp_path):
    s = _run(dict(inputs=[corpus["jsonl"]], tokenizer_model=corpus["model"], output_prefix=str(tmp_path / "ds")))
    assert s.dataset_prefix == str(tmp_path / "ds_text_document") and s.dtype == "uint16"
    sp = _sp(corpus["model"])
    texts = [t for _, t in sample_documents()]
    docs = _read_docs(s.dataset_prefix)
    assert len(docs) == len(texts) == s.documents and s.skipped_total == 0
    for seqs, text in zip(docs, texts):
        assert seqs == [sp.encode(text) + [sp.eos_id()]]
    assert s.tokens == sum(len(d[0]) for d in docs)


def test_preprocess_sentences_text_modes_and_globs(corpus, tmp_path):
    sp = _sp(corpus["model"])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("First para. It has two sentences.\nSame para!\n\n\nSecond para?\n")
    (tmp_path / "in" / "b.txt").write_text("Only one.\n")
    s = _run(dict(inputs=[str(tmp_path / "in" / "*.txt")], tokenizer_model=corpus["model"],
                  output_prefix=str(tmp_path / "p"), text_mode="paragraph", split_sentences=True))
    assert s.dataset_prefix.endswith("p_text_sentence") and s.files == 2
    docs = _read_docs(s.dataset_prefix)
    want = [["First para. ", "It has two sentences.\n", "Same para!"], ["Second para?"], ["Only one."]]
    # one sequence per sentence; the document's last sentence carries the EOD id
    assert docs == [[sp.encode(x) for x in w[:-1]] + [sp.encode(w[-1]) + [sp.eos_id()]] for w in want]
    # line mode: one document per non-empty line
    s = _run(dict(inputs=[str(tmp_path / "in" / "a.txt")], tokenizer_model=corpus["model"],
                  output_prefix=str(tmp_path / "l"), text_mode="line"))
    assert [sp.decode(d[0][:-1]) for d in _read_docs(s.dataset_prefix)] == \
        ["First para. It has two sentences.", "Same para!", "Second para?"]


def test_multiworker_output_identical_to_single_worker(corpus, tmp_path):
    common = dict(inputs=[corpus["jsonl"]], tokenizer_model=corpus["model"], chunk_bytes=16_000)
    one = _run(common, output_prefix=str(tmp_path / "one"), workers=1)
    two = _run(common, output_prefix=str(tmp_path / "two"), workers=2)
    for ext in (".bin", ".idx"):
        with open(one.dataset_prefix + ext, "rb") as a, open(two.dataset_prefix + ext, "rb") as b:
            assert a.read() == b.read(), ext
    # and the chunk size does not change the result either
    big = _run(common, output_prefix=str(tmp_path / "big"), chunk_bytes=1 << 22)
    with open(one.dataset_prefix + ".bin", "rb") as a, open(big.dataset_prefix + ".bin", "rb") as b:
        assert a.read() == b.read()


# ---------------------------------------------------------------- bad input

GOOD = b'{"text": "A good document."}'
BAD_LINES = {  # kind -> raw line
    "malformed_json": b'{"text": "unterminated',
    "missing_field": b'{"body": "no text field"}',
    "field_not_string": b'{"text": 42}',
    "not_an_object": b'["a", "list"]',
    "invalid_utf8": b'{"text": "bad \xff\xfe bytes"}',
    "empty_document": b'{"text": "   \\n "}',
}


def _bad_file(tmp_path):
    lines = [GOOD, b""]  # a blank line carries no document and is not an error
    for raw in BAD_LINES.values():
        lines.append(raw)
    lines.append(GOOD)
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path), {kind: 3 + i for i, kind in enumerate(BAD_LINES)}  # 1-based line numbers


@pytest.mark.parametrize("workers, chunk_bytes", [(1, 1 << 20), (2, 16)])  # 16: a block of a line or two
def test_bad_input_skip_reports_file_line_and_counts(corpus, tmp_path, capsys, workers, chunk_bytes):
    path, line_of = _bad_file(tmp_path)
    log = tmp_path / "bad.log"
    s = _run(dict(inputs=[path], tokenizer_model=corpus["model"], output_prefix=str(tmp_path / "o"),
                  bad_lines_log=str(log), max_bad_fraction=1.0,  # 6 of 8 bad: allowed here
                  workers=workers, chunk_bytes=chunk_bytes))
    assert s.documents == 2 and s.skipped == {k: 1 for k in BAD_LINES} and s.skipped_total == 6
    err = capsys.readouterr().err
    for kind, line in line_of.items():
        assert f"{path}:{line}: {kind}:" in err
    logged = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(r["line"], r["kind"]) for r in logged] == [(line_of[k], k) for k in BAD_LINES]
    assert "\\xff" in next(r["detail"] for r in logged if r["kind"] == "invalid_utf8")
    assert len(_read_docs(s.dataset_prefix)) == 2
    assert "skipped        6" in s.format() and "invalid_utf8" in s.format()


def test_lone_surrogate_escape_is_reported_not_replaced(corpus, tmp_path, capsys):
    """JSON can escape half a surrogate pair ("\\ud800"): text with no UTF-8 form. It is
    reported as invalid UTF-8 with its line; a proper pair of escapes is one character, kept."""
    path = tmp_path / "s.jsonl"
    path.write_bytes(GOOD + b'\n{"text": "half \\ud800 pair"}\n{"text": "pair \\ud83d\\ude00 ok"}\n')
    s = _run(dict(inputs=[str(path)], tokenizer_model=corpus["model"], output_prefix=str(tmp_path / "o"),
                  max_bad_fraction=1.0))
    assert s.documents == 2 and s.skipped == {"invalid_utf8": 1}
    assert f"{path}:2: invalid_utf8: field 'text' holds the lone surrogate \\ud800" in capsys.readouterr().err
    sp = _sp(corpus["model"])
    assert [sp.decode(d[0][:-1]) for d in _read_docs(s.dataset_prefix)] == ["A good document.", "pair \U0001F600 ok"]
    assert s.encoder == "tiktoken" and "encoder        tiktoken" in s.format()


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_bad_input_fail_policy(corpus, tmp_path, kind):
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD + b"\n" + BAD_LINES[kind] + b"\n" + GOOD + b"\n")
    with pytest.raises(BadInputError, match=f"{path}:2: {kind}:"):
        _run(dict(inputs=[str(path)], tokenizer_model=corpus["model"], output_prefix=str(tmp_path / "o"),
                  on_error="fail"))
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no dataset, no partial files


def test_text_input_invalid_utf8_and_errors(corpus, tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"fine line\nbroken \xc3\x28 line\nanother fine line\n")
    s = _run(dict(inputs=[str(path)], tokenizer_model=corpus["model"], output_prefix=str(tmp_path / "o"),
                  max_bad_fraction=0.5))
    assert s.documents == 2 and s.skipped == {"invalid_utf8": 1}
    with pytest.raises(ValueError, match="matches no files"):
        _run(dict(inputs=[str(tmp_path / "*.nothing")], tokenizer_model=corpus["model"],
                  output_prefix=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        _run(dict(inputs=[str(path)], tokenizer_model=corpus["model"], output_prefix=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="--on-error must be one of"):
        PreprocessConfig(inputs=[str(path)], tokenizer_model=corpus["model"], output_prefix="x", on_error="ignore")


# ---------------------------------------------------------------- crash safety


def test_interrupted_run_leaves_no_dataset_and_keeps_old_one(corpus, tmp_path, monkeypatch):
    import data_tools.preprocess as pp

    cfg = dict(inputs=[corpus["jsonl"]], tokenizer_model=corpus["model"], output_prefix=str(tmp_path / "d"),
               chunk_bytes=20_000)
    calls = {"n": 0}
    real = pp._append_chunk

    def interrupt_on_third(builder, enc):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(builder, enc)

    monkeypatch.setattr(pp, "_append_chunk", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(pp, "_append_chunk", real)
    good = _run(cfg)
    before = {ext: open(good.dataset_prefix + ext, "rb").read() for ext in (".bin", ".idx")}
    # an interrupted overwrite leaves the previous dataset untouched
    calls["n"] = 0
    monkeypatch.setattr(pp, "_append_chunk", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["d_text_document.bin", "d_text_document.idx"]
    assert {ext: open(good.dataset_prefix + ext, "rb").read() for ext in (".bin", ".idx")} == before


def _fork(target, *args):
    """Run ``target`` in a forked child: it inherits the imported megatron-core, so no
    second multi-second import (the child only uses numpy/sentencepiece/file IO)."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=target, args=args)
    proc.start()
    return proc


def _preprocess_child(inputs, model, out, chunk_bytes):
    import sys

    from data_tools.preprocess import main

    sys.exit(main(["--input", *inputs, "--tokenizer", model, "--output-prefix", out, "--no-progress",
                   "--chunk-bytes", str(chunk_bytes)]))


def test_killed_process_leaves_only_partial_names(corpus, tmp_path):
    """SIGKILL (no cleanup possible) mid-run: nothing at the output name looks like a dataset."""
    import time

    big = write_sample_corpus(str(tmp_path / "big.jsonl"), repeat=20)  # ~10 MB
    prefix = tmp_path / "k_text_document"
    proc = _fork(_preprocess_child, [big], corpus["model"], str(tmp_path / "k"), 50_000)
    try:
        deadline, partial = time.time() + 60, []
        while time.time() < deadline and proc.exitcode is None:
            partial = [p for p in glob.glob(str(tmp_path / "k_*.partial-*")) if os.path.getsize(p) > 0]
            if partial:
                break
            time.sleep(0.01)
        assert partial and proc.exitcode is None, "preprocess finished before it could be killed"
    finally:
        proc.kill()
        proc.join()
    assert not os.path.exists(f"{prefix}.bin") and not os.path.exists(f"{prefix}.idx")
    left = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "k_*")))
    assert left and all(".partial-" in name for name in left)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert not IndexedDataset.exists(str(prefix))
    for p in glob.glob(str(tmp_path / "k_*.partial-*")):  # and no partial pair is a dataset either
        assert not IndexedDataset.exists(p.rsplit(".", 2)[0] + ".partial") and not p.endswith((".bin", ".idx"))


def _rss_child(path, model, out, result_file):
    """Preprocess with 2 workers while a thread samples this process's and the workers' RSS."""
    import threading
    import time

    import psutil

    # The writer imports megatron-core (and torch) lazily; import it first so that the
    # baseline does not depend on which tests ran before in this process.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: F401

    me = psutil.Process()
    peak = {"main": 0, "worker": 0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak["main"] = max(peak["main"], me.memory_info().rss)
            for c in me.children(recursive=True):
                try:  # USS: a forked worker's RSS also counts the parent's pages it shares
                    peak["worker"] = max(peak["worker"], c.memory_full_info().uss)
                except psutil.Error:
                    pass
            time.sleep(0.005)

    base = me.memory_info().rss
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    s = preprocess(PreprocessConfig(inputs=[path], tokenizer_model=model, output_prefix=out, workers=2,
                                    chunk_bytes=1 << 20, progress=False))
    done.set()
    t.join()
    with open(result_file, "w") as f:
        json.dump({"base": base, "peak_main": peak["main"], "peak_worker": peak["worker"],
                   "documents": s.documents, "input_bytes": s.input_bytes}, f)


def test_streaming_memory_is_flat_for_large_input(corpus, tmp_path):
    """A 64 MB input; the writer's RSS may grow by at most 20 MB (workers: 200 MB private each).

    Most of each record is a field that is not tokenized, so the file is large (what the
    reader and the in-flight window must stream) while tokenization stays quick on 2 CI
    cores. Reading the file whole, or letting the reader run ahead of the workers
    (``Pool.imap``), exceeds the bound.
    """
    import random

    rng = random.Random(0)
    words = " ".join(t for _, t in sample_documents()).split()
    path = tmp_path / "large.jsonl"
    n_docs = 0
    with open(path, "w") as f:
        while f.tell() < 64 * 2**20:
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=40)), "meta": "x" * 5000}) + "\n")
            n_docs += 1
    size = os.path.getsize(path)
    proc = _fork(_rss_child, str(path), corpus["model"], str(tmp_path / "o"), str(tmp_path / "r.json"))
    proc.join(300)
    assert proc.exitcode == 0
    r = json.load(open(tmp_path / "r.json"))
    assert r["documents"] == n_docs and r["input_bytes"] > 0.99 * size - n_docs
    growth = r["peak_main"] - r["base"]
    assert growth < 20 * 2**20, f"writer RSS grew by {growth / 2**20:.1f} MB on a {size / 2**20:.0f} MB input: {r}"
    assert 0 < r["peak_worker"] < 200 * 2**20, r


# ---------------------------------------------------------------- training side


def test_gpt_dataset_built_on_output_yields_samples(corpus, tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from kla_megatron.training.tokenizer import load_tokenizer

    s = _run(dict(inputs=[corpus["jsonl"]], tokenizer_model=corpus["model"], output_prefix=str(tmp_path / "g")))
    tok = load_tokenizer(corpus["model"])
    cfg = GPTDatasetConfig(random_seed=1234, sequence_length=64, blend=([s.dataset_prefix], None), split="90,10,0",
                           path_to_cache=str(tmp_path / "cache"), tokenizer=tok, reset_position_ids=False,
                           reset_attention_mask=False, eod_mask_loss=False, mmap_bin_files=True)
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [200, 20, None], lambda: True, cfg).build()
    assert len(train) >= 200 and len(valid) >= 20 and test is None
    stream = np.fromfile(s.dataset_prefix + ".bin", dtype=np.uint16)
    for i in (0, 7, 199):
        sample = train[i]
        tokens, labels = sample["tokens"].numpy(), sample["labels"].numpy()
        assert tokens.shape == (64,) and (tokens < tok.vocab_size).all()
        assert np.array_equal(tokens[1:], labels[:-1])
        # a sample is a window of the token stream unless it straddles shuffled documents
        window = np.concatenate([tokens, labels[-1:]])
        if tok.eod not in window[:-1]:
            hits = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(stream, 65).__eq__(window).all(1))
            assert len(hits) >= 1


# ---------------------------------------------------------------- merge / inspect / sample / CLI


def test_merge_and_inspect(corpus, tmp_path):
    from data_tools.inspect_dataset import format_info, inspect_dataset
    from data_tools.merge import merge_datasets

    a = _run(dict(inputs=[corpus["jsonl"]], tokenizer_model=corpus["model"], output_prefix=str(tmp_path / "a")))
    p = tmp_path / "b.txt"
    p.write_text("one doc\nand another\n")
    b = _run(dict(inputs=[str(p)], tokenizer_model=corpus["model"], output_prefix=str(tmp_path / "b")))
    r = merge_datasets([a.dataset_prefix, b.dataset_prefix + ".idx"], str(tmp_path / "m"))
    assert r["documents"] == a.documents + 2 and r["tokens"] == a.tokens + b.tokens
    assert _read_docs(str(tmp_path / "m")) == _read_docs(a.dataset_prefix) + _read_docs(b.dataset_prefix)
    with pytest.raises(ValueError, match="already exists"):
        merge_datasets([a.dataset_prefix], str(tmp_path / "m"))
    with pytest.raises(ValueError, match="not an indexed dataset"):
        merge_datasets([str(tmp_path / "nope")], str(tmp_path / "m2"))

    info = inspect_dataset(str(tmp_path / "m"), corpus["model"], samples=2)
    assert info["documents"] == r["documents"] and info["tokens"] == r["tokens"]
    assert info["eod_count"] == r["documents"] and info["ids_outside_vocab"] == 0
    assert info["top_tokens"][0]["count"] >= info["top_tokens"][-1]["count"]
    texts = {t for _, t in sample_documents()} | {"one doc", "and another"}
    for smp in info["samples"]:
        assert smp["text"].endswith("</s>") or smp["truncated"]
        assert any(t.startswith(smp["text"].removesuffix("</s>")) for t in texts)
    # the counts the report prints, from the corpus itself (its size varies with Python's pydoc_data)
    documents = sum(1 for line in open(corpus["jsonl"]) if line.strip()) + 2
    tokens = sum(len(seq) for doc in _read_docs(str(tmp_path / "m")) for seq in doc)
    report = format_info(info).splitlines()
    assert f"documents      {documents}" in report and f"tokens         {tokens}" in report, report[:4]


def test_sample_corpus_is_deterministic(tmp_path):
    a = write_sample_corpus(str(tmp_path / "a.jsonl"))
    b = write_sample_corpus(str(tmp_path / "b.jsonl"))
    assert open(a, "rb").read() == open(b, "rb").read()
    recs = [json.loads(x) for x in open(a)]
    assert len(recs) >= 50 and all(r["text"].strip() for r in recs)
    assert sum(len(r["text"]) for r in recs) > 300_000


def test_prepare_sample_is_idempotent(tmp_path):
    from data_tools.prepare_sample import prepare_sample

    m = prepare_sample(str(tmp_path / "s"), vocab_size=512)
    mtimes = {f: os.path.getmtime(f) for f in (m["tokenizer_model"], m["data_prefix"] + ".bin")}
    assert prepare_sample(str(tmp_path / "s"), vocab_size=512) == m
    assert {f: os.path.getmtime(f) for f in mtimes} == mtimes
    assert m["vocab_size"] == 512 and m["eod"] == 2 and m["documents"] == len(sample_documents())
    assert len(_read_docs(m["data_prefix"])) == m["documents"]


@pytest.mark.parametrize("module", ["data_tools.train_tokenizer", "data_tools.preprocess", "data_tools.cli",
                                    "data_tools.sample_corpus", "data_tools.prepare_sample"])
def test_commands_have_help(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr


def test_unwritable_output_prefix_is_one_line_and_writes_nothing(corpus, tmp_path, capsys):
    from data_tools.preprocess import main

    blocker = tmp_path / "a_file"  # a file where the output's directory should be
    blocker.write_text("")
    rc = main(["--input", corpus["jsonl"], "--tokenizer", corpus["model"], "--output-prefix", str(blocker / "out"),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("kla-preprocess: error: ") and str(blocker) in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert os.listdir(tmp_path) == ["a_file"]
