"""What an input file is, from its first bytes: its compression, and whether its content is
text we can read, parquet, or a binary format we refuse.

Compression is recognised by magic bytes, not by the file name (a ``.jsonl`` that is really
gzip is read as gzip): gzip, zstandard and xz. Content is judged on the first KB after
decompression: parquet (``PAR1``) is read by ``parquet_input.py``; a known binary signature
(archive, image, executable, indexed dataset, Arrow, ...) or a NUL byte means binary data,
which is refused with one line naming the file: tokenising it as text would write a dataset
of garbage fragments.
"""
from __future__ import annotations

import gzip
import io
import lzma
from typing import BinaryIO, Callable, Optional, Tuple

SNIFF_BYTES = 1024

_CODECS = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"))

PARQUET_MAGIC = b"PAR1"

# (signature at offset 0, what it is) of formats that are not text.
_BINARY_MAGIC = (
    (b"PK\x03\x04", "a zip archive"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"BZh", "bzip2 data (decompress it first)"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"RIFF", "a RIFF file (WAV/WebP/AVI)"),
    (b"%PDF-", "a PDF document"),
    (b"\x7fELF", "an ELF executable"),
    (b"MMIDIDX\x00\x00", "a megatron-core index (.idx), already a dataset"),
    (b"\x93NUMPY", "a numpy array (.npy)"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"ARROW1", "an Arrow IPC file"),
    (b"\xff\xff\xff\xff", "an Arrow IPC stream (a datasets save_to_disk folder? use --hf-dataset)"),
    (b"\xff\xfe", "UTF-16 text (convert it to UTF-8)"),
    (b"\xfe\xff", "UTF-16 text (convert it to UTF-8)"),
)


class BinaryInputError(ValueError):
    """An input file whose content is not a format we read."""


def codec_of(head: bytes) -> Optional[str]:
    """``gzip``, ``zstd``, ``xz`` or None (not compressed), from the first raw bytes."""
    return next((name for magic, name in _CODECS if head.startswith(magic)), None)


def content_kind(head: bytes) -> str:
    """``parquet``, ``text`` or a description of a binary format, from decompressed bytes."""
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.startswith(b"BZh") and head[4:10] != b"1AY&SY":
        return "text"  # "BZh..." as words, not a bzip2 header
    for magic, what in _BINARY_MAGIC:
        if head.startswith(magic):
            return what
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive"
    if b"\x00" in head:
        return f"binary data (NUL bytes in the first {SNIFF_BYTES} bytes)"
    return "text"


def open_stream(path: str) -> Tuple[BinaryIO, Callable[[], int]]:
    """Open ``path`` decompressed (by its magic bytes); returns the binary stream and a
    function giving how many bytes of the file on disk have been consumed (for progress)."""
    raw = open(path, "rb", buffering=0)
    try:
        codec = codec_of(raw.read(8))
        raw.seek(0)
        if codec == "gzip":
            stream: BinaryIO = gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20), mode="rb")
        elif codec == "xz":
            stream = lzma.LZMAFile(io.BufferedReader(raw, 1 << 20), mode="rb")
        elif codec == "zstd":
            stream = io.BufferedReader(_ZstdFrames(raw), 1 << 20)
        else:
            stream = io.BufferedReader(raw, 1 << 20)
    except BaseException:
        raw.close()
        raise
    return _Closing(stream, raw), raw.tell


class _ZstdFrames(io.RawIOBase):
    """zstd frames one after another (parallel compressors write several), decompressed.

    Unlike zstandard's stream reader, a file that ends inside a frame (a truncated download)
    raises EOFError, as gzip and xz do, instead of ending quietly."""

    def __init__(self, raw):
        import zstandard

        self._raw, self._dctx = raw, zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._started = False  # bytes of the current frame were fed
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            data = self._raw.read(1 << 20)
            if not data:
                if self._started and not self._frame.eof:
                    raise EOFError("zstd data ends inside a frame (truncated file)")
                return 0
            self._out, self._pos = self._decompress(data), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = memoryview(self._out)[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame.eof:  # the previous frame is complete: the next one starts here
                self._frame = self._dctx.decompressobj()
            self._started = True
            out.append(self._frame.decompress(data))
            data = self._frame.unused_data if self._frame.eof else b""
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def decompression_errors() -> tuple:
    """What reading a damaged compressed file raises (EOFError for a truncated one)."""
    import zlib

    import zstandard

    return EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError, zstandard.ZstdError


class _Closing(io.BufferedIOBase):
    """The decompressed stream, closing the raw file with it (gzip/lzma do not)."""

    def __init__(self, stream, raw):
        self._stream, self._raw = stream, raw

    def readable(self):
        return True

    def read(self, n=-1):
        return self._stream.read(n)

    def read1(self, n=-1):
        return self._stream.read1(n)

    def readline(self, limit=-1):
        return self._stream.readline(limit)

    def __iter__(self):
        return iter(self._stream)

    def close(self):
        try:
            self._stream.close()
        finally:
            self._raw.close()
            super().close()


def sniff(path: str) -> Tuple[Optional[str], str]:
    """``(codec, content kind)`` of a file: see ``codec_of`` and ``content_kind``."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    codec = codec_of(head)
    if codec is None:
        return None, content_kind(head)
    stream, _ = open_stream(path)
    with stream:
        try:
            return codec, content_kind(stream.read(SNIFF_BYTES))
        except Exception as e:  # OSError, EOFError, LZMAError, ZstdError (not an OSError)
            raise BinaryInputError(f"input {path} looks {codec}-compressed but does not decompress: {e}") from None
