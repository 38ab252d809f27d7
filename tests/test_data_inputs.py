"""kla-preprocess inputs and scale: parquet, zst/xz, directories and globs, Hugging Face
datasets, binary files refused, --max-bad-fraction, identical output for any worker count,
per-shard outputs that resume, and the progress line."""
from __future__ import annotations

import gzip
import io
import json
import lzma
import os

import numpy as np
import pytest

from data_tools.inputs import BadInputError
from data_tools.preprocess import PreprocessConfig, main, preprocess
from data_tools.sample_corpus import sample_documents, write_sample_corpus
from data_tools.train_tokenizer import TokenizerConfig, train_tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    jsonl = write_sample_corpus(str(d / "sample.jsonl"))
    train_tokenizer(TokenizerConfig(inputs=[jsonl], output_prefix=str(d / "tok"), vocab_size=1024, num_threads=1))
    return str(d / "tok.model")


@pytest.fixture(scope="module")
def texts():
    """About 80 documents of varied English and code, a few hundred KB."""
    return [t for _, t in sample_documents()]


def _run(tok, inputs, out, **kw):
    return preprocess(PreprocessConfig(inputs=inputs, tokenizer_model=tok, output_prefix=str(out),
                                       progress=False, **kw))


def _docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _bytes(prefix):
    return {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")}


def _encode(tok, texts):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tok)
    return [sp.encode(t) + [sp.eos_id()] for t in texts]


def _write_parquet(path, columns, row_group_size):
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)
    return str(path)


def _main_error(capsys, argv):
    """Run the CLI; returns (exit code, the last stderr line) and checks it is one clean line."""
    rc = main([*argv, "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert not any("Traceback" in line for line in err), err
    return rc, err[-1] if err else ""


# ---------------------------------------------------------------- parquet


def test_parquet_row_groups_and_column_choice(tok, texts, tmp_path):
    n = len(texts)
    path = _write_parquet(tmp_path / "p.parquet", {"id": list(range(n)), "body": texts,
                                                   "text": [t.upper() for t in texts]}, row_group_size=7)
    assert pq.ParquetFile(path).metadata.num_row_groups == -(-n // 7) > 5
    s = _run(tok, [path], tmp_path / "b", json_key="body")
    assert s.dataset_prefix.endswith("b_body_document") and s.documents == n and s.skipped_total == 0
    assert _docs(s.dataset_prefix) == _encode(tok, texts)
    s = _run(tok, [path], tmp_path / "t")  # default column "text"
    assert _docs(s.dataset_prefix) == _encode(tok, [t.upper() for t in texts])
    # a dictionary-encoded (categorical) column comes back as a dictionary array
    path = _write_parquet(tmp_path / "d.parquet", {"cat": pa.array(texts[:10] * 2).dictionary_encode()}, 7)
    assert pa.types.is_dictionary(pq.read_table(path).schema.field("cat").type)
    s = _run(tok, [path], tmp_path / "c", json_key="cat")
    assert _docs(s.dataset_prefix) == _encode(tok, texts[:10] * 2)


def test_parquet_identical_for_workers_and_streamed_row_groups(tok, texts, tmp_path, monkeypatch):
    """Row groups as worker items (1 and 2 workers) and large row groups streamed by the
    reader in batches (a small chunk) give byte-identical datasets, equal to the JSONL."""
    from data_tools import parquet_input

    path = _write_parquet(tmp_path / "p.parquet", {"text": texts * 3}, row_group_size=40)
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 3))
    calls = {"read_row_group": 0, "iter_row_batches": 0}
    for name in calls:
        def counted(*a, _real=getattr(parquet_input, name), _name=name):
            calls[_name] += 1
            return _real(*a)
        monkeypatch.setattr(parquet_input, name, counted)
    one = _run(tok, [path], tmp_path / "one", workers=1)
    assert calls == {"read_row_group": 6, "iter_row_batches": 0}  # 237 rows: 6 row-group items
    two = _run(tok, [path], tmp_path / "two", workers=2)
    streamed = _run(tok, [path], tmp_path / "streamed", chunk_bytes=4096)  # every row group > 8 chunks
    assert calls == {"read_row_group": 6, "iter_row_batches": 6}
    ref = _run(tok, [str(jsonl)], tmp_path / "ref")
    assert _bytes(one.dataset_prefix) == _bytes(two.dataset_prefix) == _bytes(streamed.dataset_prefix) \
        == _bytes(ref.dataset_prefix)
    assert one.documents == 3 * len(texts) and one.input_bytes == 3 * sum(len(t.encode()) for t in texts)


def test_parquet_missing_column_is_one_line(tok, tmp_path, capsys):
    path = _write_parquet(tmp_path / "p.parquet", {"content": ["a", "b"], "url": ["u", "v"]}, 10)
    rc, line = _main_error(capsys, ["--input", path, "--tokenizer", tok, "--output-prefix", str(tmp_path / "o")])
    assert rc == 1 and line.startswith("kla-preprocess: error: ")
    assert f"{path} has no column 'text' (columns: content, url); choose one with --text-column" in line
    assert sorted(os.listdir(tmp_path)) == ["p.parquet"]


def test_parquet_nulls_and_non_strings_are_bad_rows(tok, tmp_path, capsys):
    text = ["good one", None, "good two", "", "good three", None] * 4  # rows 1, 3, 5, ... are bad
    path = _write_parquet(tmp_path / "n.parquet", {"text": text, "n": list(range(len(text)))}, row_group_size=5)
    log = tmp_path / "bad.jsonl"
    s = _run(tok, [path], tmp_path / "o", max_bad_fraction=1.0, bad_lines_log=str(log))
    assert s.documents == 12 and s.skipped == {"field_not_string": 8, "empty_document": 4}
    err = capsys.readouterr().err
    assert f"skipped {path}:row 1: field_not_string: column 'text' is null" in err
    assert f"skipped {path}:row 3: empty_document:" in err and f"{path}:row 23: field_not_string" in err
    assert [(r["row"], r["kind"][:5]) for r in map(json.loads, log.read_text().splitlines())][:3] == \
        [(1, "field"), (3, "empty"), (5, "field")]
    with pytest.raises(BadInputError, match=f"{path}:row 1: field_not_string: column 'text' is null"):
        _run(tok, [path], tmp_path / "f", on_error="fail")
    # a column of numbers: every row is bad, reported with its row
    with pytest.raises(BadInputError, match=f"{path}:row 0: field_not_string: column 'n' holds int64"):
        _run(tok, [path], tmp_path / "g", json_key="n", on_error="fail")
    rc, line = _main_error(capsys, ["--input", path, "--tokenizer", tok, "--output-prefix", str(tmp_path / "h"),
                                    "--text-column", "n"])
    assert rc == 1 and "24 of 24 documents were bad (100%: field_not_string 24" in line


# ---------------------------------------------------------------- compression, directories, globs


def test_zst_xz_gz_read_like_plain(tok, texts, tmp_path):
    import zstandard

    raw = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl").write_bytes(raw)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "a.jsonl.xz").write_bytes(lzma.compress(raw))
    # two zstd frames, as a parallel compressor writes them
    half = raw.index(b"\n", len(raw) // 2) + 1
    zc = zstandard.ZstdCompressor()
    (tmp_path / "a.jsonl.zst").write_bytes(zc.compress(raw[:half]) + zc.compress(raw[half:]))
    (tmp_path / "misnamed.jsonl").write_bytes(zc.compress(raw))  # the content says zstd, not the name
    ref = _run(tok, [str(tmp_path / "a.jsonl")], tmp_path / "ref")
    assert ref.documents == len(texts)
    for name in ("a.jsonl.gz", "a.jsonl.xz", "a.jsonl.zst", "misnamed.jsonl"):
        s = _run(tok, [str(tmp_path / name)], tmp_path / name.replace(".", "_"))
        assert _bytes(s.dataset_prefix) == _bytes(ref.dataset_prefix), name
    # 2 workers read a plain file's blocks themselves at their offsets; a compressed one's (the
    # misnamed zstd too) are sent to them decompressed
    for name in ("a.jsonl", "misnamed.jsonl"):
        s = _run(tok, [str(tmp_path / name)], tmp_path / f"w2_{name}", workers=2, chunk_bytes=4096)
        assert _bytes(s.dataset_prefix) == _bytes(ref.dataset_prefix), name


@pytest.mark.parametrize("codec", ["gz", "xz", "zst"])
def test_truncated_compressed_input_is_one_line(tok, tmp_path, capsys, codec):
    import zstandard

    raw = "".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(2000)).encode()
    data = {"gz": gzip.compress, "xz": lzma.compress, "zst": zstandard.ZstdCompressor().compress}[codec](raw)
    path = tmp_path / f"cut.jsonl.{codec}"
    path.write_bytes(data[: len(data) * 2 // 3])  # a download that stopped early
    rc, line = _main_error(capsys, ["--input", str(path), "--tokenizer", tok, "--output-prefix", str(tmp_path / "o")])
    assert rc == 1 and f"input {path} is truncated or damaged: it could not be decompressed to its end" in line
    assert sorted(os.listdir(tmp_path)) == [path.name]


def test_directory_and_glob_inputs_sorted(tok, tmp_path, capsys):
    d = tmp_path / "raw"
    (d / "sub").mkdir(parents=True)
    (d / "b.jsonl").write_text('{"text": "from b"}\n')
    (d / "a.jsonl").write_text('{"text": "from a"}\n')
    (d / "sub" / "c.txt").write_text("from c\n")
    (d / "_SUCCESS").write_bytes(b"")  # job markers and hidden files are left out
    (d / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    (d / "README.md").write_text("# a dataset card, not data\n")
    (d / "sub" / "config.yaml").write_text("name: x\n")
    from data_tools.inputs import expand_inputs

    want = [str(d / "a.jsonl"), str(d / "b.jsonl"), str(d / "sub" / "c.txt")]
    assert expand_inputs([str(d)]) == want
    assert f"input directory {d}: left out 2 file(s) that are not data: README.md, sub/config.yaml" in \
        capsys.readouterr().err
    assert expand_inputs([str(d / "*.jsonl"), str(d / "sub" / "*.txt")]) == want  # globs: as matched, sorted
    s = _run(tok, [str(d)], tmp_path / "o")
    g = _run(tok, want, tmp_path / "g")
    assert s.files == 3 and s.documents == 3 and _bytes(s.dataset_prefix) == _bytes(g.dataset_prefix)
    with pytest.raises(ValueError, match="has no files"):
        (tmp_path / "empty").mkdir()
        _run(tok, [str(tmp_path / "empty")], tmp_path / "e")


# ---------------------------------------------------------------- Hugging Face datasets


def test_hf_save_to_disk_folder_and_streamed_files(tok, texts, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    rows = texts[:20] + [None]
    ds = datasets.Dataset.from_dict({"text": rows, "id": list(range(len(rows)))})
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    ds.save_to_disk(str(tmp_path / "one"))
    s = preprocess(PreprocessConfig(hf_dataset=str(tmp_path / "dd"), tokenizer_model=tok, progress=False,
                                    output_prefix=str(tmp_path / "o"), max_bad_fraction=0.1))
    assert s.documents == 20 and s.skipped == {"field_not_string": 1} and s.files == 1
    assert _docs(s.dataset_prefix) == _encode(tok, texts[:20])
    assert f"skipped {tmp_path / 'dd'}[train]:row 20: field_not_string: column 'text' is null" in capsys.readouterr().err
    v = preprocess(PreprocessConfig(hf_dataset=str(tmp_path / "dd"), hf_split="validation", tokenizer_model=tok,
                                    progress=False, output_prefix=str(tmp_path / "v")))
    assert _docs(v.dataset_prefix) == _encode(tok, texts[:3])
    one = preprocess(PreprocessConfig(hf_dataset=str(tmp_path / "one"), tokenizer_model=tok, progress=False,
                                      output_prefix=str(tmp_path / "one_out"), workers=2, chunk_bytes=2000))
    assert _bytes(one.dataset_prefix) == _bytes(s.dataset_prefix)
    rc, line = _main_error(capsys, ["--hf-dataset", str(tmp_path / "dd"), "--hf-split", "test", "--tokenizer", tok,
                                    "--output-prefix", str(tmp_path / "x")])
    assert rc == 1 and "has no split 'test' (splits: train, validation); choose one with --hf-split" in line
    # load_dataset on local files, streamed (no cache written, no network)
    jsonl = tmp_path / "f.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:20]))
    st = preprocess(PreprocessConfig(hf_dataset="json", hf_data_files=[str(jsonl)], streaming=True,
                                     tokenizer_model=tok, progress=False, output_prefix=str(tmp_path / "st")))
    assert _bytes(st.dataset_prefix) == _bytes(s.dataset_prefix)


# ---------------------------------------------------------------- refused inputs


def _zip_bytes():
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "text inside a zip\n" * 50)
    return buf.getvalue()


BINARIES = {
    "image.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "a PNG image"),
    "corpus.zip": (_zip_bytes(), "a zip archive"),
    "tokens.bin": (np.arange(3000, dtype=np.uint16).tobytes(), "binary data (NUL bytes"),
    "dataset.idx": (b"MMIDIDX\x00\x00" + bytes(100), "a megatron-core index"),
    "text.txt.gz": (gzip.compress(b"\x00\x01binary\x00" * 100), "binary data (NUL bytes"),
}


@pytest.mark.parametrize("name", list(BINARIES))
def test_binary_file_refused_with_one_line(tok, tmp_path, capsys, name):
    data, what = BINARIES[name]
    bad = tmp_path / name
    bad.write_bytes(data)
    good = tmp_path / "good.txt"
    good.write_text("a fine line\n")
    rc, line = _main_error(capsys, ["--input", str(good), str(bad), "--tokenizer", tok,
                                    "--output-prefix", str(tmp_path / "o")])
    assert rc == 1 and line.startswith(f"kla-preprocess: error: input {bad} is {what}"), line
    assert "no dataset was written" in line and sorted(os.listdir(tmp_path)) == sorted([name, "good.txt"])


def test_parquet_as_text_is_refused(tok, tmp_path, capsys):
    path = _write_parquet(tmp_path / "p.parquet", {"text": ["x"] * 10}, 5)
    rc, line = _main_error(capsys, ["--input", path, "--input-format", "text", "--tokenizer", tok,
                                    "--output-prefix", str(tmp_path / "o")])
    assert rc == 1 and f"input {path} is a parquet file, not text; drop --input-format text" in line
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("just text\n")
    rc, line = _main_error(capsys, ["--input", str(not_parquet), "--tokenizer", tok,
                                    "--output-prefix", str(tmp_path / "o")])
    assert rc == 1 and f"input {not_parquet} is not a parquet file (no PAR1 header)" in line


def test_max_bad_fraction(tok, tmp_path, capsys):
    path = tmp_path / "mostly_bad.txt"
    path.write_bytes(b"good one\n\xff\xfe bad\ngood two\n\xc3\x28 bad\n\xff bad\ngood three\n")  # 3 of 6 bad
    argv = ["--input", str(path), "--tokenizer", tok, "--output-prefix", str(tmp_path / "o")]
    rc, line = _main_error(capsys, argv)
    assert rc == 1 and "3 input(s): " not in line and "1 input(s): 3 of 6 documents were bad (50%: invalid_utf8 3" in line
    assert "more than --max-bad-fraction 0.1" in line and f"first: {path}:2: invalid_utf8" in line
    assert sorted(os.listdir(tmp_path)) == ["mostly_bad.txt"]
    rc, _ = _main_error(capsys, argv + ["--max-bad-fraction", "0.5"])
    assert rc == 0 and len(_docs(str(tmp_path / "o_text_document"))) == 3
    with pytest.raises(ValueError, match="between 0 and 1"):
        PreprocessConfig(inputs=[str(path)], tokenizer_model=tok, output_prefix="x", max_bad_fraction=1.5)


# ---------------------------------------------------------------- per-shard outputs, resume


def _shard_inputs(tmp_path, texts):
    d = tmp_path / "raw"
    d.mkdir()
    _write_parquet(d / "part-0.parquet", {"text": texts[:30]}, 8)
    (d / "part-1.jsonl.zst").write_bytes(__import__("zstandard").ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[30:60]).encode()))
    (d / "part-2.txt").write_text("\n".join(t.replace("\n", " ") for t in texts[60:]) + "\n")
    (d / "part-3.txt").write_text("")  # an empty shard: a marker, no dataset
    return d


def test_shard_outputs_resume_skips_finished_shards(tok, texts, tmp_path, capsys):
    raw = _shard_inputs(tmp_path, texts)
    base = ["--input", str(raw), "--tokenizer", tok, "--output-prefix", str(tmp_path / "out"), "--shard-outputs"]
    # an earlier run that finished shard 1 only (task 1 of 4), then was killed in shard 2
    assert main(base + ["--task-index", "1", "--task-count", "4", "--no-progress"]) == 0
    shards = tmp_path / "out_shards"
    done = [shards / f"00001_text_document{ext}" for ext in (".bin", ".idx", ".done.json")]
    before = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in done}
    assert sorted(os.listdir(shards)) == sorted(p.name for p in done)
    stale = shards / "00002_text_document.bin.partial-999999"
    stale.write_bytes(b"half written")
    capsys.readouterr()

    assert main(base + ["--merge", "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "shards         4 (1 already finished, 3 done now;" in out
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in done} == before  # not rewritten
    assert not stale.exists()
    assert json.load(open(shards / "00003_text_document.done.json"))["dataset"] is None
    # the merged dataset equals one run over the same inputs
    whole = _run(tok, [str(raw)], tmp_path / "whole")
    assert _bytes(str(tmp_path / "out_text_document")) == _bytes(whole.dataset_prefix)

    # a shard whose input changed since its marker is not silently reused
    with open(raw / "part-2.txt", "a") as f:
        f.write("one more line\n")
    rc, line = _main_error(capsys, base)
    assert rc == 1 and "00002_text_document.done.json was written for another input or settings (size" in line
    assert "finished shards are kept" in line
    assert main(base + ["--overwrite", "--no-progress"]) == 0  # redoes that shard only
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in done} == before


def test_shard_with_mostly_bad_documents_stops_the_run_and_keeps_finished_shards(tok, tmp_path, capsys):
    d = tmp_path / "raw"
    d.mkdir()
    (d / "a.txt").write_text("good\nlines\nonly\n")
    (d / "b.txt").write_bytes(b"good\n\xff bad\n\xfe bad\n")
    (d / "c.txt").write_text("never reached\n")
    base = ["--input", str(d), "--tokenizer", tok, "--output-prefix", str(tmp_path / "o"), "--shard-outputs"]
    rc, line = _main_error(capsys, base)
    assert rc == 1 and f"shard 1 ({d / 'b.txt'}): 2 of 3 documents were bad (67%" in line
    assert line.endswith("finished shards are kept and a rerun resumes")
    shards = tmp_path / "o_shards"
    assert sorted(os.listdir(shards)) == [f"00000_text_document{e}" for e in (".bin", ".done.json", ".idx")]
    assert main(base + ["--max-bad-fraction", "1", "--merge", "--no-progress"]) == 0
    assert "(1 already finished, 2 done now;" in capsys.readouterr().out
    assert len(_docs(str(tmp_path / "o_text_document"))) == 3 + 1 + 1


def test_shard_markers_fingerprint_a_tokenizer_folder(tmp_path):
    """A tokenizer can be a folder (tokenizer.json + config): its files make the fingerprint."""
    from data_tools.shards import _sha256

    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")
    first = _sha256(str(d))
    assert _sha256(str(d)) == first
    (d / "tokenizer_config.json").write_text('{"eos_token": "x"}')
    assert _sha256(str(d)) != first
    assert _sha256(str(d / "tokenizer.json")) != first


def test_merge_needs_every_shard(tok, texts, tmp_path, capsys):
    raw = _shard_inputs(tmp_path, texts)
    rc, line = _main_error(capsys, ["--input", str(raw), "--tokenizer", tok, "--output-prefix", str(tmp_path / "o"),
                                    "--shard-outputs", "--merge", "--task-index", "0", "--task-count", "2"])
    assert rc == 1 and "cannot merge: 2 of 4 shards are not finished" in line
    assert not os.path.exists(tmp_path / "o_text_document.idx")


# ---------------------------------------------------------------- progress


def test_progress_line_has_bytes_docs_tokens_rate_eta(tok, texts, tmp_path, capsys):
    path = _write_parquet(tmp_path / "p.parquet", {"text": texts}, 10)
    s = preprocess(PreprocessConfig(inputs=[path], tokenizer_model=tok, output_prefix=str(tmp_path / "o")))
    last = capsys.readouterr().err.strip().splitlines()[-1]  # not a terminal: plain lines
    size = os.path.getsize(path) / 1e6
    assert last.startswith(f"preprocess: {size:.2f}/{size:.2f} MB (100%), {s.documents:,} docs, ")
    assert " tokens, " in last and " MB/s, " in last and " docs/s, ETA 0s" in last


def test_progress_bar_on_a_terminal():
    from data_tools.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    p = Progress(2_000_000, stream=out)
    p.update(1_000_000, 10, 12_345)
    p.update(1_000_000, 5, 1_000)
    p.close()
    text = out.getvalue()
    assert "preprocess" in text and "2.00M/2.00M " in text and "docs=15" in text and "tokens=13.3k" in text
    assert "B/s" in text and "<" in text  # rate and the elapsed<remaining ETA


# ---------------------------------------------------------------- Slurm array example


def test_slurm_array_script_preprocesses_shards_then_merges(tok, texts, tmp_path, capsys):
    """launch/slurm/preprocess_array.sbatch as Slurm runs it: 2 array tasks, then the merge job.
    The script runs with DRY_RUN=1 (no Slurm needed) and the command it prints runs here."""
    import shlex
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    raw = _shard_inputs(tmp_path, texts)
    args = ["--input", str(raw), "--tokenizer", tok, "--output-prefix", str(tmp_path / "fw"), "--no-progress"]

    def job(**env):
        r = subprocess.run(["bash", "launch/slurm/preprocess_array.sbatch", *args], cwd=repo, capture_output=True,
                           text=True, timeout=60, env={**os.environ, "KLA_REPO": repo, "DRY_RUN": "1", **env})
        if r.returncode:
            return r.returncode, r.stderr
        argv = shlex.split(r.stderr.strip().split("] ", 1)[1])
        assert argv[:3] == ["python", "-m", "data_tools.preprocess"], argv
        code = main(argv[3:])
        return code, " ".join(argv) + "\n" + capsys.readouterr().out

    for task in ("1", "0"):
        rc, out = job(SLURM_ARRAY_TASK_ID=task, SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_TASK_MIN="0", KLA_WORKERS="1")
        assert rc == 0 and f"--task-index {task} --task-count 2" in out and "shards         4" in out, out
    assert sorted(os.listdir(tmp_path / "fw_shards"))[:3] == [f"00000_text_document{e}" for e in (".bin", ".done.json", ".idx")]
    rc, out = job(KLA_MERGE="1", SLURM_CPUS_PER_TASK="2")
    assert rc == 0 and "--workers 2 --shard-outputs --merge" in out and "(4 already finished, 0 done now;" in out
    whole = _run(tok, [str(raw)], tmp_path / "whole")
    assert _bytes(str(tmp_path / "fw_text_document")) == _bytes(whole.dataset_prefix)
    rc, err = job()
    assert rc == 2 and "not an array task" in err
    rc, err = job(SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_TASK_MIN="4")
    assert rc == 2 and "number the array from 0" in err
