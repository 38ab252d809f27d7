"""Kind ``tiktoken``: a BPE rank file in tiktoken's format (one ``<base64 token> <rank>`` per
line, as ``cl100k_base.tiktoken``, ``o200k_base.tiktoken`` or Llama 3's ``tokenizer.model``),
plus the two things the file does not hold: the pre-tokenizer pattern and the special tokens.

They come from a preset (``PRESETS``), chosen by the sidecar ``<file>.yaml``::

    pattern: cl100k_base        # a preset name, or a regex
    special_tokens: [<|endoftext|>]   # list: ids follow the last rank; or {token: id}
    eod: <|endoftext|>          # default: the preset's, else the first of EOD_NAMES present
    bos: <|begin_of_text|>      # optional (default: the preset's), never added
    vocab_size: 32768           # optional: reserve ids up to this size

(a sidecar that lists ``special_tokens`` takes only the pattern from a preset; EOD then
defaults to the first of ``EOD_NAMES`` among them) or, without a sidecar, by the file name:
``<preset>.tiktoken`` (``cl100k_base.tiktoken``...), and Llama 3's 128,000-rank
``tokenizer.model``. Ids are tiktoken's ``encode_ordinary``: special
tokens spelled out in text are text. EOD is ``<|endoftext|>`` (GPT-2/GPT-4 presets),
``<|end_of_text|>`` (llama3) or ``<|bos|>`` (nanochat, whose document separator it is: nanochat
puts it before each document, we put it after). No BOS is ever added.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Dict, Iterable, List, Optional

from .base import Tokenizer, file_sha, read_sidecar, sidecar_path

_R50K = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|"""
           r"""\s*[\r\n]|\s+(?!\S)|\s""")
_O200K = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+""",
])
_LLAMA3 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
_NANOCHAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
             r"""\s*[\r\n]|\s+(?!\S)|\s+""")

_ENDOFTEXT = "<|endoftext|>"
_LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
_LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA3_SPECIALS))]
_NANOCHAT_SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                      "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

# name -> pattern, special tokens (a list: ids follow the last rank), EOD, BOS
PRESETS = {
    "gpt2": (_R50K, {_ENDOFTEXT: 50256}, _ENDOFTEXT, None),
    "r50k_base": (_R50K, {_ENDOFTEXT: 50256}, _ENDOFTEXT, None),
    "p50k_base": (_R50K, {_ENDOFTEXT: 50256}, _ENDOFTEXT, None),
    "cl100k_base": (_CL100K, {_ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                              "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}, _ENDOFTEXT, None),
    "o200k_base": (_O200K, {_ENDOFTEXT: 199999, "<|endofprompt|>": 200018}, _ENDOFTEXT, None),
    "llama3": (_LLAMA3, _LLAMA3_SPECIALS, "<|end_of_text|>", "<|begin_of_text|>"),
    "nanochat": (_NANOCHAT, _NANOCHAT_SPECIALS, "<|bos|>", "<|bos|>"),
}
EOD_NAMES = (_ENDOFTEXT, "<|end_of_text|>", "</s>", "<|eos|>", "<|bos|>")
SIDECAR_KEYS = ("pattern", "special_tokens", "eod", "bos", "vocab_size")
LLAMA3_RANKS = 128000
_RANK_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} [0-9]+$")


def looks_like_rank_file(head: bytes) -> bool:
    """True if the first line of ``head`` is a tiktoken rank line."""
    return bool(_RANK_LINE.match(head.split(b"\n", 1)[0].rstrip(b"\r")))


def read_ranks(path: str) -> Dict[bytes, int]:
    """token bytes -> rank of a rank file; ValueError naming the first bad line."""
    ranks: Dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}:{lineno}: not a tiktoken rank line '<base64 token> <rank>': "
                                 f"{line[:60]!r}") from None
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: token {token!r} is listed twice")
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: empty rank file")
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path}: two tokens share a rank")
    missing = 256 - len({t for t in ranks if len(t) == 1})
    if missing:
        raise ValueError(f"{path}: {missing} of the 256 single bytes have no rank, so some text cannot be encoded")
    return ranks


def _specials(path: str, value, first_free: int) -> Dict[str, int]:
    if isinstance(value, dict):
        if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items()):
            raise ValueError(f"{path}: special_tokens must map token strings to integer ids")
        return dict(value)
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        if len(set(value)) != len(value):
            raise ValueError(f"{path}: special_tokens lists a token twice")
        return {t: first_free + i for i, t in enumerate(value)}
    raise ValueError(f"{path}: special_tokens must be a list of token strings or a mapping token: id, "
                     f"got {value!r}")


def _preset_of(path: str, n_ranks: int) -> Optional[str]:
    name = os.path.basename(path)
    stem = name[:-len(".tiktoken")] if name.endswith(".tiktoken") else None
    if stem in PRESETS:
        return stem
    if name == "tokenizer.model" and n_ranks == LLAMA3_RANKS:
        return "llama3"
    return None


class TiktokenBPE(Tokenizer):
    kind = "tiktoken"

    def __init__(self, path: str):
        super().__init__(path)
        import tiktoken

        ranks = read_ranks(self.path)
        side = read_sidecar(self.path, SIDECAR_KEYS)
        where = sidecar_path(self.path)
        pattern = side.get("pattern")
        preset = pattern if pattern in PRESETS else None
        if pattern is None:
            preset = _preset_of(self.path, len(ranks))
            if preset is None:
                raise ValueError(f"{self.path}: a tiktoken rank file needs a pre-tokenizer pattern and special tokens: "
                                 f"write {where} with `pattern:` (one of {', '.join(PRESETS)}, or a regex) and "
                                 "`special_tokens:` (see data_tools/README.md, Tokenizers)")
        if not isinstance(pattern or preset, str):
            raise ValueError(f"{where}: pattern must be a preset name or a regex string, got {pattern!r}")
        pat, preset_specials, preset_eod, preset_bos = PRESETS[preset] if preset else (pattern, None, None, None)
        specials_value = side.get("special_tokens", preset_specials)
        if "special_tokens" in side:  # the user's own specials: the preset gives only the pattern
            preset_eod = preset_bos = None
        if specials_value is None:
            raise ValueError(f"{where}: a custom pattern needs `special_tokens:` (at least the EOD token)")
        first_free = max(ranks.values()) + 1
        self.specials = _specials(where, specials_value, first_free)
        clash = set(self.specials.values()) & set(ranks.values())
        if clash:
            raise ValueError(f"{where}: special token id {min(clash)} is also the rank of a BPE token")
        self.pattern, self.ranks = pat, ranks
        try:
            self.enc = tiktoken.Encoding(os.path.basename(self.path), pat_str=pat, mergeable_ranks=ranks,
                                         special_tokens=self.specials)
            self.enc.encode_ordinary("check the pattern compiles")
        except ValueError as e:
            raise ValueError(f"{where}: the pattern does not compile ({str(e).splitlines()[0]})") from None
        n_ids = max([first_free - 1, *self.specials.values()]) + 1
        self.vocab_size = side.get("vocab_size", n_ids)
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool):
            raise ValueError(f"{where}: vocab_size must be an integer, got {self.vocab_size!r}")
        if self.vocab_size < n_ids:
            raise ValueError(f"{where}: vocab_size {self.vocab_size} is smaller than the {n_ids} ids in use")
        self.eod = self._special(side.get("eod", preset_eod), "EOD", where)
        bos = side.get("bos", preset_bos)
        self.bos = self._special(bos, "BOS", where) if bos is not None else None

    def _special(self, name, role: str, where: str) -> int:
        if name is None:
            name = next((n for n in EOD_NAMES if n in self.specials), None)
            if name is None:
                raise ValueError(f"{where}: no EOD token: none of {', '.join(EOD_NAMES)} is a special token; "
                                 "name one as `eod:`")
        if name not in self.specials:
            raise ValueError(f"{where}: {role} token {name!r} is not one of the special tokens")
        return self.specials[name]

    def encode(self, text: str) -> List[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([int(i) for i in ids])

    def token_bytes(self, i: int) -> Optional[bytes]:
        try:
            return self.enc.decode_single_token_bytes(int(i))
        except KeyError:
            return None

    def id_to_piece(self, i: int) -> Optional[str]:
        b = self.token_bytes(i)
        return None if b is None else b.decode("utf-8", errors="backslashreplace")

    @property
    def fingerprint(self) -> str:
        return file_sha(self.path, sidecar_path(self.path))
