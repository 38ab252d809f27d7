"""Line-mode text and JSONL are read in blocks of whole lines (``inputs.line_blocks``) that the
worker splits into documents (``inputs.block_documents``): the documents and their line
numbers must be those of iterating over the file line by line, wherever the blocks are cut."""
import io

import pytest

from data_tools.inputs import _strip_eol, block_documents, line_blocks

TEXT = b"one\r\n\n  \ntwo\nthree\r\n\r\n\n\xff four\r"


def _by_line(data: bytes):
    """The definition: each line of the file without its line end, blank lines left out."""
    return [(i, _strip_eol(line)) for i, line in enumerate(io.BytesIO(data), start=1) if _strip_eol(line).strip()]


@pytest.mark.parametrize("data", [TEXT, TEXT + b"\n", b"", b"\n\n", b"last line without end"])
@pytest.mark.parametrize("block_bytes", [1, 2, 3, 5, 8, 1 << 20])
def test_blocks_give_the_documents_of_the_file_line_by_line(data, block_bytes):
    blocks = list(line_blocks(io.BytesIO(data), block_bytes))
    assert b"".join(block for _, block in blocks) == data
    assert all(block.endswith(b"\n") for _, block in blocks[:-1])  # cut only after a line end
    assert [d for first, block in blocks for d in block_documents(block, first)] == _by_line(data)


def test_the_documents_of_the_sample_text():
    assert _by_line(TEXT) == [(1, b"one"), (4, b"two"), (5, b"three"), (8, b"\xff four\r")]
