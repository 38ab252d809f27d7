"""data_tools/inputs.py function by function: problem records and their messages, which files
an input list expands to, the format a path is read in, document boundaries in each text mode,
and the verdict and message for each kind of bad document. Written against bench/mutation.sh's
surviving mutants (tests/test_data_inputs.py covers the same through kla-preprocess)."""
import gzip

import pytest

from data_tools import inputs
from data_tools.filetypes import BinaryInputError
from data_tools.inputs import (BadInputError, Problem, check_format, decode_document, expand_inputs,
                               iter_raw_documents, resolve_format, text_documents)


def test_problem_text_and_record():
    line = Problem("a.jsonl", 3, "malformed_json", "bad")
    row = Problem("b.parquet", 0, "empty_document", "empty", unit="row")
    assert str(line) == "a.jsonl:3: malformed_json: bad" and str(row) == "b.parquet:row 0: empty_document: empty"
    assert line.to_dict() == {"path": "a.jsonl", "line": 3, "kind": "malformed_json", "detail": "bad"}
    assert row.to_dict() == {"path": "b.parquet", "row": 0, "kind": "empty_document", "detail": "empty"}
    err = BadInputError(line)
    assert err.problem is line
    assert str(err) == "a.jsonl:3: malformed_json: bad (use --on-error skip to skip and count such documents)"


def _touch(path, data=b"x\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_directory_lists_data_files_sorted_and_names_what_it_leaves_out(tmp_path, capsys):
    d = tmp_path / "d"
    b, a = _touch(d / "sub" / "b.txt"), _touch(d / "a.txt")
    for name in (".hidden", "_SUCCESS", "_tmp/c.txt", ".git/d.txt"):
        _touch(d / name)
    notes = [_touch(d / n) for n in ("README", "LICENSE.txt", "card.md", "cfg.yaml", "x.py", "run.sh", "s.crc")]
    assert expand_inputs([str(d)]) == [a, b]
    err = capsys.readouterr().err.strip()
    assert err == f"input directory {d}: left out {len(notes)} file(s) that are not data: " \
                  "LICENSE.txt, README, card.md, cfg.yaml, run.sh, ..."
    only_notes = tmp_path / "notes"
    _touch(only_notes / "README.md")
    with pytest.raises(ValueError, match=r"^input directory '.*notes' has no files \(names starting"):
        expand_inputs([str(only_notes)])
    assert capsys.readouterr().err.strip().endswith("left out 1 file(s) that are not data: README.md")
    assert "readme_data.txt" not in inputs._NOT_DATA.pattern and inputs._NOT_DATA.search("readme_data.txt") is None


def test_expand_keeps_the_given_order_and_sorts_each_glob(tmp_path):
    b, a, c = _touch(tmp_path / "b.txt"), _touch(tmp_path / "a.txt"), _touch(tmp_path / "deep" / "x" / "c.txt")
    (tmp_path / "dir.txt").mkdir()  # a directory matching the glob is not a file
    assert expand_inputs([c, str(tmp_path / "*.txt")]) == [c, a, b]
    assert expand_inputs([str(tmp_path / "**" / "c.txt")]) == [c]  # recursive globs
    with pytest.raises(ValueError, match=r"^input glob '.*\*\.nope' matches no files$"):
        expand_inputs([str(tmp_path / "*.nope")])
    with pytest.raises(ValueError, match=r"^input file '.*missing.txt' does not exist$"):
        expand_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="^no input files given$"):
        expand_inputs([])


@pytest.mark.parametrize("path, fmt", [
    ("a.jsonl", "jsonl"), ("a.json", "jsonl"), ("a.ndjson", "jsonl"), ("a.jsonl.gz", "jsonl"),
    ("a.json.zst", "jsonl"), ("a.jsonl.zstd", "jsonl"), ("a.ndjson.xz", "jsonl"), ("a.parquet", "parquet"),
    ("a.pq", "parquet"), ("a.pq.gz", "parquet"), ("a.txt", "text"), ("a.txt.gz", "text"), ("jsonl", "text"),
])
def test_auto_format_from_the_name(path, fmt):
    assert resolve_format(path, "auto") == fmt


def test_an_explicit_format_wins_and_an_unknown_one_is_refused():
    assert resolve_format("a.jsonl", "text") == "text" and resolve_format("a.txt", "parquet") == "parquet"
    with pytest.raises(ValueError, match=r"^input format must be one of \('auto', 'jsonl', 'text', 'parquet'\), "
                                         r"got 'csv'$"):
        resolve_format("a.txt", "csv")


def test_check_format_looks_at_the_content(tmp_path):
    pq = _touch(tmp_path / "t.parquet", b"PAR1" + b"\x00" * 8)
    assert check_format(pq, "auto") == "parquet" and check_format(pq, "parquet") == "parquet"
    with pytest.raises(BinaryInputError, match=r"is a parquet file, not text; drop --input-format text \(or pass"):
        check_format(pq, "text")
    gz = _touch(tmp_path / "t.parquet.gz", gzip.compress(b"PAR1" + b"\x00" * 8))
    with pytest.raises(BinaryInputError, match=r"t.parquet.gz is gzip-compressed parquet; decompress it first "
                                               r"\(parquet compresses its own pages\)$"):
        check_format(gz, "auto")
    fake = _touch(tmp_path / "fake.parquet", b"hello\n")
    with pytest.raises(BinaryInputError, match=r"fake.parquet is not a parquet file \(no PAR1 header\); "
                                               r"pass --input-format text or jsonl to read it as text$"):
        check_format(fake, "auto")
    with pytest.raises(BinaryInputError, match=r"fake.parquet is not a parquet file \(no PAR1 header\)$"):
        check_format(fake, "parquet")
    blob = _touch(tmp_path / "blob.txt", b"ab\x00cd")
    with pytest.raises(BinaryInputError, match=r"blob.txt is binary data .*, not text, JSONL or parquet; remove it"):
        check_format(blob, "auto")
    assert check_format(_touch(tmp_path / "t.json", b"{}\n"), "auto") == "jsonl"
    assert check_format(_touch(tmp_path / "t.txt.gz", gzip.compress(b"hi\n")), "auto") == "text"


TEXT = b"one\r\n\n  \ntwo\nthree\n\n\nfour"


@pytest.mark.parametrize("mode, docs", [
    ("line", [(1, b"one"), (4, b"two"), (5, b"three"), (8, b"four")]),
    ("paragraph", [(1, b"one"), (4, b"two\nthree"), (8, b"four")]),
    ("file", [(1, TEXT)]),
])
def test_documents_in_each_text_mode(tmp_path, mode, docs):
    path = _touch(tmp_path / "c.txt", TEXT)
    assert list(iter_raw_documents(path, "text", mode)) == docs
    assert list(iter_raw_documents(_touch(tmp_path / "c.txt.gz", gzip.compress(TEXT)), "auto", mode)) == docs


def test_jsonl_documents_are_lines_whatever_the_text_mode(tmp_path):
    path = _touch(tmp_path / "c.jsonl", b'{"text": "a"}\n\n{"text": "b"}\r\n')
    for mode in ("line", "paragraph", "file"):
        assert list(iter_raw_documents(path, "auto", mode)) == [(1, b'{"text": "a"}'), (3, b'{"text": "b"}')]


def test_line_ends_stripped_are_only_newline_and_a_carriage_return_before_it():
    assert inputs._strip_eol(b"a\r\n") == b"a" and inputs._strip_eol(b"a\n") == b"a"
    assert inputs._strip_eol(b"a\r") == b"a\r" and inputs._strip_eol(b"a\r\r\n") == b"a\r"
    assert inputs._strip_eol(b"a") == b"a"


def test_text_documents_counts_disk_bytes_and_refuses_unknown_modes(tmp_path):
    path = _touch(tmp_path / "c.txt", b"a\nb\n")
    with text_documents(path, "text") as (docs, position):
        assert list(docs) == [(1, b"a"), (2, b"b")] and position() == 4
    with pytest.raises(ValueError, match=r"^text mode must be one of \('line', 'paragraph', 'file'\), got 'page'$"):
        with text_documents(path, "text", "page"):
            pass


def test_a_truncated_gzip_file_is_a_one_line_error(tmp_path):
    path = _touch(tmp_path / "c.txt.gz", gzip.compress(b"line\n" * 20000)[:-40])
    with pytest.raises(ValueError, match=r"^input .*c.txt.gz is truncated or damaged: it could not be "
                                         r"decompressed to its end \(EOFError: "):
        list(iter_raw_documents(path, "auto"))


@pytest.mark.parametrize("raw, fmt, verdict", [
    (b"plain text", "text", ("plain text", None, "")),
    (b'{"text": "hi", "id": 1}', "jsonl", ("hi", None, "")),
    (b'{"body": "hi"}', "jsonl", (None, "missing_field", "no field 'text' (fields: body)")),
    (b"{}", "jsonl", (None, "missing_field", "no field 'text' (fields: none)")),
    (b'{"a":1,"b":1,"c":1,"d":1,"e":1,"f":1,"g":1,"h":1,"i":1}', "jsonl",
     (None, "missing_field", "no field 'text' (fields: a, b, c, d, e, f, g, h)")),
    (b'{"text": 3}', "jsonl", (None, "field_not_string", "field 'text' is int, expected a string")),
    (b"[1]", "jsonl", (None, "not_an_object", "expected a JSON object, got list")),
    (b'{"text": ', "jsonl", (None, "malformed_json", "Expecting value at column 10")),
    (b"ok \xff\xfe", "text", (None, "invalid_utf8", "invalid UTF-8 byte(s) b'\\xff' at byte offset 3")),
    (b" \n\t", "text", (None, "empty_document", "document is empty or whitespace only")),
    (b'{"text": "  "}', "jsonl", (None, "empty_document", "document is empty or whitespace only")),
    (b'{"text": "a\\ud800b"}', "jsonl",
     (None, "invalid_utf8", "field 'text' holds the lone surrogate \\ud800 (a JSON escape with no UTF-8 form)")),
    (b'{"text": "a\\uDC00b"}', "jsonl",
     (None, "invalid_utf8", "field 'text' holds the lone surrogate \\udc00 (a JSON escape with no UTF-8 form)")),
    (b'{"text": "\\ud83d\\ude00"}', "jsonl", ("\U0001F600", None, "")),  # a paired escape is one code point
    (b'{"text": "\\\\ud800"}', "jsonl", ("\\ud800", None, "")),  # an escaped backslash, not an escape
])
def test_decode_document_verdicts(raw, fmt, verdict):
    assert decode_document(raw, fmt, "text") == verdict


def test_parquet_rows_of_the_text_column_or_a_named_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"text": ["a", "b"], "body": ["x", "y"]}), path)
    assert list(iter_raw_documents(path, "auto")) == [(0, b"a"), (1, b"b")]
    assert list(iter_raw_documents(path, "parquet", column="body")) == [(0, b"x"), (1, b"y")]


def test_line_mode_is_the_default(tmp_path):
    assert list(iter_raw_documents(_touch(tmp_path / "c.txt", b"a\nb\n\nc\n"), "auto")) == [(1, b"a"), (2, b"b"),
                                                                                            (4, b"c")]


@pytest.mark.parametrize("n, more", [(5, ""), (6, ", ...")])
def test_the_left_out_notice_names_five_files_then_says_there_are_more(tmp_path, capsys, n, more):
    _touch(tmp_path / "data.txt")
    for i in range(n):
        _touch(tmp_path / f"n{i}.md")
    expand_inputs([str(tmp_path)])
    assert capsys.readouterr().err.strip().endswith("n0.md, n1.md, n2.md, n3.md, n4.md" + more)


def test_a_paragraph_at_the_end_of_the_file_keeps_its_lines(tmp_path):
    path = _touch(tmp_path / "p.txt", b"a\n\nb\nc")
    assert list(iter_raw_documents(path, "text", "paragraph")) == [(1, b"a"), (3, b"b\nc")]
