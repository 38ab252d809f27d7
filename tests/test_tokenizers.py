"""Tokenizer kinds (kla_megatron/tokenizers): a sentencepiece .model, a Hugging Face
tokenizer.json folder and a tiktoken rank file give the same ids three ways — the dataset
kla-preprocess writes (read back with megatron-core's IndexedDataset), the trainer's
tokenizer, and the transformers tokenizer the HF export writes (AutoTokenizer) — on tricky
text. Kind detection and sidecar errors; kla-train-tokenizer's per-shard sample.

Every tokenizer is trained here from a small generated corpus (no files outside the repo, no
network)."""
from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest

from kla_megatron import tokenizers

TRICKY = [
    "Plain English: the quick brown fox jumps over the lazy dog.",
    "Ünïcödé naïve café Straße, Ελληνικά, русский, 東京都, 한국어, emoji 🙂🚀 👩‍👩‍👧 e\u0301 \u00a0nbsp \u200bzw",
    "  leading, trailing  \t\t and   runs    of     spaces      ",
    "line one\n\n\nline four\r\nwindows\rold-mac\n\n",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n\tif x:\n\t\tpass\n",
    "specials in text stay text: <|endoftext|> <|bos|> </s> <s> <|begin_of_text|>",
    "digits 1234567890 3.14159 1,000,000 and don't we'll THEY'VE 'quoted'",
    "unseen characters: ☃ ∮ ℵ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⿰",
]
_WORDS = ("the of and to in is that for it as with was on be by this are from or at an which have not they "
          "model token data train layer state filter kalman linear attention sequence value").split()
_CODE = ["for i in range(10):\n    print(i, i ** 2)\n", "if (x != y) { return a[i] + b[j]; }\n",
         "class Foo:\n    def __init__(self):\n        self.x = {'k': [1, 2, 3]}\n", "#include <stdio.h>\n"]
_UNI = ["café naïve Straße", "東京都 日本語 한국어", "русский язык", "emoji 🙂🚀", "Ελληνικά γράμματα"]


def corpus_docs(n=300, seed=0):
    """A small varied corpus: sentences, whitespace runs, code, a little unicode."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 40))]
        text = " ".join(words).capitalize() + ". "
        text += rng.choice(_CODE) if i % 3 == 0 else ""
        text += rng.choice(_UNI) if i % 4 == 0 else ""
        text += "   \t  " + str(rng.randint(0, 99999)) if i % 5 == 0 else ""
        docs.append(text)
    return docs


def _byte_level_bpe(docs, vocab_size, pattern=None, specials=()):
    """A byte-level BPE trained with the tokenizers library (pattern: a split regex before ByteLevel)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def write_rank_file(path, docs, vocab_size=400):
    """A tiktoken rank file from a byte-level BPE trained on ``docs``: rank = the BPE's id, so
    every token ranks after its parts."""
    import base64

    from kla_megatron.tokenizers.hf_export import bytes_to_unicode
    from kla_megatron.tokenizers.tiktoken_bpe import PRESETS

    tok = _byte_level_bpe(docs, vocab_size, pattern=PRESETS["nanochat"][0])
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    with open(path, "w") as f:
        for s, rank in ranks:
            f.write(f"{base64.b64encode(bytes(to_byte[c] for c in s)).decode()} {rank}\n")
    return path


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """kind -> tokenizer path, all trained on the same small corpus (a few seconds)."""
    from data_tools.train_tokenizer import TokenizerConfig, train_tokenizer
    from tokenizers import processors

    d = tmp_path_factory.mktemp("tok")
    docs = corpus_docs()
    jsonl = d / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    train_tokenizer(TokenizerConfig(inputs=[str(jsonl)], output_prefix=str(d / "spm"), vocab_size=400,
                                    num_threads=1))
    # A tokenizer.json folder as transformers writes one; its BOS template must not reach the ids.
    hf_dir = d / "hf"
    hf_dir.mkdir()
    hf = _byte_level_bpe(docs, 420, specials=["<|endoftext|>", "<|begin_of_text|>"])
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", 1)])
    hf.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "bos_token": "<|begin_of_text|>",
         "auto_map": {"AutoTokenizer": ["x.Tok", None]}, "chat_template": "{{ messages }}"}))
    ranks = write_rank_file(d / "web.tiktoken", docs)
    (d / "web.tiktoken.yaml").write_text("pattern: nanochat\nspecial_tokens: [<|endoftext|>, <|bos|>]\n")
    return {"dir": d, "sentencepiece": str(d / "spm.model"), "hf": str(hf_dir), "tiktoken": str(ranks)}


def _dataset_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    di = ds.document_indices
    return [np.concatenate([ds[s] for s in range(di[d], di[d + 1])]).tolist() for d in range(len(di) - 1)]


@pytest.mark.parametrize("kind", ["sentencepiece", "hf", "tiktoken"])
def test_dataset_training_and_export_ids_agree(kinds, kind, tmp_path):
    from transformers import AutoTokenizer

    from data_tools.preprocess import PreprocessConfig, preprocess
    from kla_megatron.checkpoint.hf_io import export_tokenizer
    from kla_megatron.training.tokenizer import load_tokenizer

    path = kinds[kind]
    jsonl = tmp_path / "tricky.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TRICKY))
    summary = preprocess(PreprocessConfig(inputs=[str(jsonl)], tokenizer_model=path, progress=False,
                                          output_prefix=str(tmp_path / "ds"),
                                          workers=1 if kind == "sentencepiece" else 2))
    dataset = _dataset_docs(summary.dataset_prefix)
    from data_tools.inspect_dataset import inspect_dataset

    info = inspect_dataset(summary.dataset_prefix, path, samples=len(TRICKY), max_chars=10 ** 6)
    assert info["tokenizer_kind"] == kind and info["eod_count"] == len(TRICKY) and info["ids_outside_vocab"] == 0
    assert all(s["text"].startswith(TRICKY[s["document"]]) for s in info["samples"])

    train_tok = load_tokenizer(path)
    assert train_tok.kind == kind and summary.eod == train_tok.eod and summary.vocab_size == train_tok.vocab_size
    training = [train_tok.tokenize(t) + [train_tok.eod] for t in TRICKY]
    assert dataset == training
    assert [train_tok.detokenize(ids[:-1]) for ids in training] == TRICKY  # lossless, byte fallback included
    assert pickle.loads(pickle.dumps(train_tok)).tokenize(TRICKY[1]) == training[1][:-1]

    out = tmp_path / "export"
    export_tokenizer(path, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in cfg
    hf = AutoTokenizer.from_pretrained(str(out))
    exported = [ids + [hf.eos_token_id] for ids in hf(TRICKY)["input_ids"]]  # default call: no BOS added
    assert exported == training
    assert [hf.decode(ids[:-1]) for ids in exported] == TRICKY
    assert len(hf) <= train_tok.vocab_size
    with pytest.raises(ValueError, match=f"has {train_tok.vocab_size} tokens but the model's vocab_size is 256"):
        export_tokenizer(path, tmp_path / "small", max_vocab=256)  # kla-convert passes the model's vocab_size
    # The exported folder is itself a tokenizer our loader reads, with the same EOD.
    again = tokenizers.load(str(out))
    assert again.eod == train_tok.eod and again.encode(TRICKY[4]) == training[4][:-1]


def test_kinds_state_eod_bos_and_sizes(kinds):
    spm, hf, tt = (tokenizers.load(kinds[k]) for k in ("sentencepiece", "hf", "tiktoken"))
    assert (spm.kind, spm.eod, spm.bos, spm.id_to_piece(spm.eod)) == ("sentencepiece", 2, 1, "</s>")
    assert (hf.kind, hf.id_to_piece(hf.eod), hf.id_to_piece(hf.bos)) == ("hf", "<|endoftext|>", "<|begin_of_text|>")
    assert hf.vocab_size == 420
    # list specials follow the last rank; EOD defaults to <|endoftext|>
    assert (tt.kind, tt.vocab_size, tt.eod, tt.specials["<|bos|>"]) == ("tiktoken", 402, 400, 401)
    assert tt.bos is None and tt.id_to_piece(tt.eod) == "<|endoftext|>"
    for tok in (spm, hf, tt):
        assert tok.encode("") == [] and tok.eod not in tok.encode("<|endoftext|></s>")


def test_tiktoken_presets_by_name_and_sidecar(kinds, tmp_path):
    import shutil

    ranks = kinds["tiktoken"]
    shutil.copyfile(ranks, tmp_path / "cl100k_base.tiktoken")  # a known encoding's name: its pattern and ids
    tok = tokenizers.load(str(tmp_path / "cl100k_base.tiktoken"))
    assert (tok.eod, tok.vocab_size) == (100257, 100277)
    import tiktoken

    from kla_megatron.tokenizers.tiktoken_bpe import PRESETS

    ref = tiktoken.Encoding("ref", pat_str=PRESETS["cl100k_base"][0], mergeable_ranks=tok.ranks, special_tokens={})
    assert tok.encode(TRICKY[4]) == ref.encode_ordinary(TRICKY[4])
    # GPT-4's pattern cuts digit runs in threes with a possessive repeat ({1,3}+), which Oniguruma
    # (tokenizers) reads as a repeated group: a token across the cut ("34") tells them apart.
    import base64

    from transformers import AutoTokenizer

    from kla_megatron.tokenizers.hf_export import export

    (tmp_path / "digits").mkdir()
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)] + ["MzQ= 256"]  # "34"
    (tmp_path / "digits" / "cl100k_base.tiktoken").write_text("\n".join(lines) + "\n")
    tok = tokenizers.load(str(tmp_path / "digits" / "cl100k_base.tiktoken"))
    assert tok.encode("1234 34") == [49, 50, 51, 52, 32, 256]
    export(tok, tmp_path / "cl100k")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "cl100k"))
    assert hf("1234 34")["input_ids"] == [49, 50, 51, 52, 32, 256]

    shutil.copyfile(ranks, tmp_path / "x.tiktoken")
    side = tmp_path / "x.tiktoken.yaml"
    side.write_text("pattern: nanochat\n")  # the preset's nine specials follow the ranks; EOD is <|bos|>
    tok = tokenizers.load(str(tmp_path / "x.tiktoken"))
    assert (tok.eod, tok.bos, tok.vocab_size) == (400, 400, 409)
    side.write_text("pattern: '\\s+|\\S+'\nspecial_tokens: {'<|eos|>': 500}\neod: <|eos|>\nvocab_size: 512\n")
    tok = tokenizers.load(str(tmp_path / "x.tiktoken"))
    assert (tok.eod, tok.vocab_size) == (500, 512) and tok.decode(tok.encode(TRICKY[2])) == TRICKY[2]

    for text, match in [("patern: nanochat\n", "unknown setting 'patern'.*did you mean 'pattern'"),
                        ("pattern: nanochat\neod: <|nope|>\n", "EOD token '<|nope|>' is not one of the special"),
                        ("pattern: '\\s+'\n", "custom pattern needs `special_tokens:`"),
                        ("pattern: '(unclosed'\nspecial_tokens: [<|endoftext|>]\n", "pattern does not compile"),
                        ("pattern: nanochat\nspecial_tokens: {'<|endoftext|>': 5}\n", "id 5 is also the rank"),
                        ("pattern: nanochat\nvocab_size: 10\n", "vocab_size 10 is smaller than the 409"),
                        ("pattern: nanochat\nvocab_size: lots\n", "vocab_size must be an integer"),
                        ("- nanochat\n", "expected a mapping of settings"),
                        ("pattern: [nanochat\n", "invalid YAML")]:
        side.write_text(text)
        with pytest.raises(ValueError, match=match):
            tokenizers.load(str(tmp_path / "x.tiktoken"))
    side.unlink()
    with pytest.raises(ValueError, match=r"needs a pre-tokenizer pattern.*x\.tiktoken\.yaml"):
        tokenizers.load(str(tmp_path / "x.tiktoken"))


def test_kind_detection_and_one_line_errors(kinds, tmp_path):
    assert tokenizers.detect_kind(kinds["hf"])[0] == "hf"
    assert tokenizers.detect_kind(os.path.join(kinds["hf"], "tokenizer.json"))[0] == "hf"
    assert tokenizers.detect_kind(kinds["tiktoken"])[0] == "tiktoken"
    # A Llama 3 style folder: the rank file is called tokenizer.model (llama3 preset at 128,000 ranks only).
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "tokenizer.model").write_bytes(open(kinds["tiktoken"], "rb").read())
    assert tokenizers.detect_kind(str(llama)) == ("tiktoken", str(llama / "tokenizer.model"))
    with pytest.raises(ValueError, match="needs a pre-tokenizer pattern"):
        tokenizers.load(str(llama))
    spm_dir = tmp_path / "spm"
    spm_dir.mkdir()
    (spm_dir / "tokenizer.model").write_bytes(open(kinds["sentencepiece"], "rb").read())
    assert tokenizers.load(str(spm_dir)).kind == "sentencepiece"

    (tmp_path / "empty").mkdir()
    (tmp_path / "two").mkdir()
    for name in ("a.tiktoken", "b.tiktoken"):
        (tmp_path / "two" / name).write_text("QQ== 0\n")
    bad = {"notes.txt": b"just some words\n", "config.json": b'{"vocab_size": 3}', "broken.json": b"{oops",
           "empty.model": b"", "tokenizer.tiktoken": b"QUJD 0\nnot base64!! x\n"}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    for name, match in [("notes.txt", "not a tokenizer file this program reads"),
                        ("config.json", "JSON without a 'model' entry"), ("broken.json", "JSON that does not parse"),
                        ("empty.model", "empty file"), ("tokenizer.tiktoken", r"tokenizer\.tiktoken:2: not a tiktoken"),
                        ("missing.model", "does not exist"), ("two", "exactly one \\*.tiktoken"),
                        ("llama/../empty", "folder without tokenizer.json")]:
        with pytest.raises(ValueError, match=match) as err:
            tokenizers.load(str(tmp_path / name))
        assert "\n" not in str(err.value)
    (tmp_path / "few.tiktoken").write_text("QQ== 0\n")
    with pytest.raises(ValueError, match="255 of the 256 single bytes have no rank"):
        tokenizers.load(str(tmp_path / "few.tiktoken"))


def test_hf_eod_choice(kinds, tmp_path):
    import shutil

    d = tmp_path / "hf"
    shutil.copytree(kinds["hf"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": {"content": "<|begin_of_text|>"}}))
    assert tokenizers.load(str(d)).eod == 1  # the config's EOS (an AddedToken dict)
    (d / "tokenizer.json.yaml").write_text("eod: <|endoftext|>\n")
    assert tokenizers.load(str(d)).eod == 0  # the sidecar wins
    (d / "tokenizer.json.yaml").write_text("eod: <|nope|>\n")
    with pytest.raises(ValueError, match="EOD token '<|nope|>' is not in the vocabulary"):
        tokenizers.load(str(d))
    # No config, no sidecar, no known EOD name: say how to name one.
    (d / "tokenizer.json.yaml").unlink()
    (d / "tokenizer_config.json").unlink()
    plain = _byte_level_bpe(corpus_docs(50), 300)
    plain.save(str(d / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"no EOD token.*eod: <token>"):
        tokenizers.load(str(d))


def test_preprocess_refuses_unknown_tokenizer_in_one_line(tmp_path):
    from data_tools.preprocess import main

    (tmp_path / "in.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "tok.bin").write_bytes(b"\x00\x01binary")
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tmp_path / "tok.bin"),
                   "--output-prefix", str(tmp_path / "o"), "--no-progress"])
    assert rc == 1 and "tok.bin: not a tokenizer file this program reads" in err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1 and not list(tmp_path.glob("o*"))


def test_tiktoken_export_keeps_whole_pretoken_tokens(tmp_path):
    """tiktoken emits a pre-token that is itself a token whole, even when no merge path builds it
    (as in Llama 3's table): the exported BPE must too (ignore_merges)."""
    import base64

    from transformers import AutoTokenizer

    from kla_megatron.tokenizers.hf_export import export

    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    lines.append(f"{base64.b64encode(b'qzx').decode()} 256")  # no 'qz' or 'zx': unreachable by merges
    (tmp_path / "t.tiktoken").write_text("\n".join(lines) + "\n")
    (tmp_path / "t.tiktoken.yaml").write_text("pattern: llama3\nspecial_tokens: [<|end_of_text|>]\n")
    tok = tokenizers.load(str(tmp_path / "t.tiktoken"))
    assert tok.encode("qzx qzx qzxq") == [256, 32, 113, 122, 120, 32, 113, 122, 120, 113] and tok.eod == 257
    export(tok, tmp_path / "out", extra_texts=["qzx"])
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert hf("qzx qzx qzxq")["input_ids"] == tok.encode("qzx qzx qzxq") and hf.eos_token_id == 257


def test_train_tokenizer_samples_every_shard_deterministically(tmp_path):
    """kla-train-tokenizer reads about N bytes from each shard, spread over the shard (not its
    start), seeded: the last shard contributes, and the same seed gives the same sample."""
    from data_tools.train_tokenizer import TokenizerConfig, main, sample_sentences

    shards = []
    for s in range(6):
        path = tmp_path / f"part-{s:02d}.jsonl"
        path.write_text("".join(json.dumps({"text": f"shard{s} doc{d} " + "filler words here " * 5}) + "\n"
                                for d in range(200)))
        shards.append(str(path))

    def sample(**over):
        cfg = TokenizerConfig(**{"inputs": shards, "output_prefix": str(tmp_path / "t"),
                                 "sample_bytes_per_shard": 2000, **over})
        lines, _, stats = sample_sentences(cfg, cfg.inputs)
        return lines, stats

    lines, stats = sample()
    assert stats.shards == 6 and 6 * 1200 <= stats.sampled_bytes < 6 * 2300  # about 2000 bytes of each 22 KB shard
    per_shard = {s: [ln for ln in lines if ln.startswith(f"shard{s} ")] for s in range(6)}
    assert all(10 <= len(v) <= 25 for v in per_shard.values())  # the last shard too
    docs = [int(ln.split()[1][3:]) for ln in per_shard[5]]
    assert max(docs) >= 100 and docs != list(range(len(docs)))  # spread over the shard, not its first lines
    assert sample()[0] == lines and sample(seed=1)[0] != lines
    lines3, stats3 = sample(max_shards=3)
    assert stats3.shards == 3 and len({ln.split()[0] for ln in lines3}) == 3 and sample(max_shards=3)[0] == lines3
    everything, all_stats = sample(sample_bytes_per_shard=0)
    assert all_stats.documents == 1200

    # parquet shards (the FineWeb-Edu format) with the text in a column of another name
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": [f"parquet doc{d} " + "words here " * 5 for d in range(300)]}),
                   str(tmp_path / "web.parquet"), row_group_size=50)
    pq_lines, pq_stats = sample(inputs=[str(tmp_path / "web.parquet")], json_key="content")
    assert pq_stats.shards == 1 and 10 <= len(pq_lines) <= 40 and max(int(x.split()[1][3:]) for x in pq_lines) > 150

    rc = main(["--input", str(tmp_path / "part-*.jsonl"), "--output-prefix", str(tmp_path / "tok"), "--vocab-size",
               "300", "--sample-bytes-per-shard", "2K", "--num-threads", "1"])
    desc = json.loads((tmp_path / "tok.json").read_text())["training_data"]
    assert rc == 0 and desc["sample_bytes_per_shard"] == 2048 and desc["shards"] == 6 and desc["documents"] < 200


@pytest.mark.parametrize("kind", ["hf", "tiktoken"])
def test_training_datasets_read_other_kinds(kinds, kind, tmp_path):
    """megatron-core's GPTDataset takes the adapter for every kind; the model's vocabulary must hold
    the tokenizer's (the check the trainer makes on data.tokenizer)."""
    from types import SimpleNamespace

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from data_tools.preprocess import PreprocessConfig, preprocess
    from kla_megatron.training.data import _tokenizer

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_docs(120, seed=3)))
    s = preprocess(PreprocessConfig(inputs=[str(jsonl)], tokenizer_model=kinds[kind], progress=False,
                                    output_prefix=str(tmp_path / "g")))
    run = SimpleNamespace(data=SimpleNamespace(kind="indexed", tokenizer=kinds[kind]))
    tok = _tokenizer(run, 512)
    with pytest.raises(ValueError, match=f"has {tok.vocab_size} tokens but the model's vocab_size is 400"):
        _tokenizer(run, 400)
    cfg = GPTDatasetConfig(random_seed=1, sequence_length=32, blend=([s.dataset_prefix], None), split="1,0,0",
                           path_to_cache=str(tmp_path / "cache"), tokenizer=tok, reset_position_ids=False,
                           reset_attention_mask=False, eod_mask_loss=False, mmap_bin_files=True)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [50, None, None], lambda: True, cfg).build()
    tokens = np.stack([train[i]["tokens"].numpy() for i in range(50)])
    assert (tokens < tok.vocab_size).all() and (tokens == tok.eod).any()
    assert tok.unique_identifiers["model_sha256"] == tokenizers.load(kinds[kind]).fingerprint


def test_train_byte_bpe_writes_a_tiktoken_tokenizer(tmp_path):
    """kla-train-tokenizer --model-type byte-bpe: a rank file + sidecar our loader reads (EOD = the
    first special token), learned from whole documents (blank lines become tokens), deterministic,
    and exported like any tiktoken file."""
    from data_tools.train_tokenizer import main

    docs = [d.replace(". ", ".\n\n", 1) for d in corpus_docs(200)]
    for s in range(2):
        (tmp_path / f"p{s}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[s::2]))
    argv = ["--input", str(tmp_path / "p*.jsonl"), "--model-type", "byte-bpe", "--vocab-size", "384",
            "--special-tokens", "<|endoftext|>", "<|bos|>", "--num-threads", "1"]
    assert main([*argv, "--output-prefix", str(tmp_path / "a")]) == 0
    assert main([*argv, "--output-prefix", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a.tiktoken").read_bytes() == (tmp_path / "b.tiktoken").read_bytes()
    tok = tokenizers.load(str(tmp_path / "a.tiktoken"))
    desc = json.loads((tmp_path / "a.json").read_text())
    assert (tok.kind, tok.vocab_size, tok.eod, tok.specials["<|bos|>"]) == ("tiktoken", 384, 382, 383)
    assert desc["eod"] == {"id": 382, "piece": "<|endoftext|>"} and desc["round_trip_check"]["mismatches"] == 0
    assert desc["training_data"]["shards"] == 2 and desc["training_data"]["documents"] == 200
    assert any(b"\n\n" in t for t in tok.ranks)  # learned across lines
    assert all(tok.decode(tok.encode(t)) == t for t in TRICKY)
    assert len(tok.encode(docs[0])) < len(docs[0].encode()) / 2  # it compresses what it saw
    from kla_megatron.tokenizers.hf_export import export

    export(tok, tmp_path / "hf", extra_texts=docs[:20])  # raises if the HF tokenizer's ids differ
    assert main([*argv, "--output-prefix", str(tmp_path / "a")]) == 1  # outputs exist: no --overwrite
    assert main([*argv[:5], "300", "--special-tokens", "<|endoftext|>", "--num-threads", "1",
                 "--output-prefix", str(tmp_path / "c"), "--pattern", "(unclosed"]) == 1


def test_llama3_rank_file_is_recognised(tmp_path):
    """A 128,000-rank tokenizer.model in tiktoken format (Llama 3's) gets the llama3 preset:
    256 special tokens after the ranks, EOD <|end_of_text|>, BOS <|begin_of_text|>."""
    import base64
    import itertools

    pairs = (bytes(p) for p in itertools.product(range(256), repeat=2))
    triples = (bytes(p) for p in itertools.product(range(32, 127), repeat=3))  # printable ascii
    tokens = [bytes([b]) for b in range(256)] + list(itertools.islice(itertools.chain(pairs, triples), 128000 - 256))
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                                                      for r, t in enumerate(tokens)))
    tok = tokenizers.load(str(tmp_path))
    assert (tok.kind, tok.vocab_size, tok.eod, tok.bos) == ("tiktoken", 128256, 128001, 128000)
    assert tok.id_to_piece(128009) == "<|eot_id|>" and tok.id_to_piece(128255) == "<|reserved_special_token_246|>"
    assert tok.decode(tok.encode("Hello  world\n")) == "Hello  world\n"
