"""Language-model text: corpora read from tmp roots (gz, plain, folders, paths), poems' text field,
missing / corrupt / non-UTF-8 errors; the four tokenizers (round trips, save/load); the cached token memmap;
the window loader (shift, determinism, resume, process shares, evaluation coverage); the shared data."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from llmlab.data import (
    DATASETS,
    DataCorruptError,
    DataMissingError,
    dataset_status,
    download_dataset,
    lm_text,
)
from llmlab.data.lm_text import (
    CHINESE_NOVELS,
    NOVELS,
    TEXT_NAMES,
    TINYSHAKESPEARE,
    WindowLoader,
    bytes_per_token,
    load_text,
    split_tokens,
    token_memmap,
)
from llmlab.data.lm_tokenizers import (
    UNK_TEXT,
    BertChineseTokenizer,
    BpeTokenizer,
    CharTokenizer,
    Gpt2Tokenizer,
    TextTokenizer,
    TokenizerError,
    _normalise_for_check,
    build_tokenizer,
    load_text_tokenizer,
    tokenizer_from_json,
)
from tests.data.test_store import no_proxy, serve  # noqa: F401  (no_proxy: a fixture used below)

ENGLISH = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
HOSTILE = [
    "  leading spaces",
    "tabs\tand\r\nCRLF",
    "emoji 😀 and 中文 «quoted»",
    "a </s> b <pad> <s><unk>",
    "x",
]


def _write(path: Path, text: str | bytes, gz: bool = False) -> Path:
    data = text.encode("utf-8") if isinstance(text, str) else text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


# ---------------------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------------------


def test_paths_plain_gz_and_folders(tmp_path, monkeypatch):
    folder = tmp_path / "texts"
    _write(folder / "b.txt.gz", "second\r\nfile\n", gz=True)
    _write(folder / "a.txt", "\ufefffirst file")
    _write(folder / "c.md", "not text of the corpus")
    _write(folder / ".hidden.txt", "editor leftovers")
    corpus = load_text(folder)
    assert corpus.text == "first file\nsecond\nfile\n"  # name order, "\n" between files, BOM and CR gone
    assert corpus.source == str(folder) and "2 files" in corpus.notes[0]
    assert load_text(str(folder / "b.txt.gz")).text == "second\nfile\n"
    assert load_text(folder / "a.txt").text == "first file"
    # a relative path: the working directory first, then the data root
    monkeypatch.chdir(tmp_path)
    assert load_text("texts/a.txt").text == "first file"
    monkeypatch.chdir(folder)
    assert load_text("texts/a.txt", root=tmp_path).text == "first file"
    _write(folder / "a.txt.gz", "twice", gz=True)
    with pytest.raises(ValueError, match="both NAME and NAME.gz for a.txt"):
        load_text(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataMissingError, match=r"no \*\.txt"):
        load_text(tmp_path / "empty")


def test_named_sets_from_a_tmp_root(tmp_path):
    _write(tmp_path / "tinyshakespeare/input.txt.gz", ENGLISH, gz=True)
    corpus = load_text("tinyshakespeare", tmp_path, verify=False)
    assert corpus.text == ENGLISH and corpus.source.endswith("input.txt.gz")
    assert "not verified" in corpus.notes[0]
    for i, stem in enumerate(NOVELS):  # gz and plain mixed, CRLF line ends as in the source repository
        _write(tmp_path / f"chinese_novels/{stem}.txt", f"《{stem}》\r\n\r\n    第{i}回\r\n", gz=i % 2 == 0)
    novels = load_text("chinese_novels", tmp_path, verify=False)
    assert novels.text == "\n".join(f"《{s}》\n\n    第{i}回\n" for i, s in enumerate(NOVELS))
    assert "\r" not in novels.text and "4 novels" in novels.notes[-1]
    assert load_text("xiyouji", tmp_path, verify=False).text == "《xiyouji》\n\n    第3回\n"


def test_poems_keep_the_text_field(tmp_path):
    lines = [
        "帝京篇十首 一\t太宗皇帝\t秦川雄帝宅，函谷壯皇居。",
        "新樂府 捕蝗\t\t刺長吏也\t白居易\t捕蝗捕蝗誰家子，天熱日長飢欲死。",  # a title holding tabs
        "",
        "聯句\t光\t威\t裒\t朱樓影直日當午，玉樹陰低月已三。",
    ]
    _write(tmp_path / "chinese_poetry/tang_poems.txt.gz", "\n".join(lines) + "\n", gz=True)
    corpus = load_text("tang_poems", tmp_path, verify=False)
    assert corpus.text.split("\n") == [
        "秦川雄帝宅，函谷壯皇居。",
        "捕蝗捕蝗誰家子，天熱日長飢欲死。",
        "朱樓影直日當午，玉樹陰低月已三。",
    ]
    assert "3 poems" in corpus.notes[1]
    _write(tmp_path / "chinese_poetry/song_ci.txt", "导引\t和岘\t气和玉烛\nno tabs here\n")
    with pytest.raises(DataCorruptError, match=r"song_ci.txt line 2: no tab"):
        load_text("song_ci", tmp_path, verify=False)


def test_missing_data_names_files_and_sources(tmp_path):
    with pytest.raises(DataMissingError) as e:
        load_text("tinyshakespeare", tmp_path)
    assert "input.txt" in str(e.value) and "karpathy/char-rnn" in str(e.value)
    _write(tmp_path / "chinese_novels/hongloumeng.txt", "红楼梦")
    with pytest.raises(DataMissingError) as e:
        load_text("chinese_novels", tmp_path)
    msg = str(e.value)
    assert "3 of 4 files" in msg and "tennessine/corpus" in msg and "西游记.txt -> xiyouji.txt" in msg
    assert all(f"{s}.txt" in msg for s in NOVELS[1:]) and "hongloumeng.txt:" not in msg
    assert e.value.missing == [f"{s}.txt" for s in NOVELS[1:]]
    with pytest.raises(DataMissingError, match=r"(?s)song_ci.txt.*chinese-poetry/chinese-poetry"):
        load_text("song_ci", tmp_path)
    with pytest.raises(ValueError, match="unknown text 'shakespeare'.*tinyshakespeare, chinese_novels"):
        load_text("shakespeare", tmp_path)


def test_corrupt_and_non_utf8_files_are_clear_errors(tmp_path):
    _write(tmp_path / "tinyshakespeare/input.txt", ENGLISH)
    with pytest.raises(DataCorruptError, match="checksum mismatch.*input.txt"):
        load_text("tinyshakespeare", tmp_path)
    latin1 = _write(tmp_path / "latin1.txt", "caf\u00e9\nna\u00efve".encode("latin-1"))
    with pytest.raises(DataCorruptError, match=r"latin1.txt: not UTF-8 text \(line 1") as e:
        load_text(latin1)
    assert e.value.path == latin1
    _write(tmp_path / "chinese_novels/xiyouji.txt", "西游记".encode("gb18030"))
    with pytest.raises(DataCorruptError, match="xiyouji.txt: not UTF-8"):
        load_text("xiyouji", tmp_path, verify=False)
    broken = _write(tmp_path / "broken.txt.gz", gzip.compress(b"x" * 1000)[:20])
    with pytest.raises(DataCorruptError, match="broken.txt.gz: cannot read it"):
        load_text(broken)


def test_specs_registered_and_tinyshakespeare_downloads_plain(tmp_path, no_proxy):  # noqa: F811
    assert {"tinyshakespeare", "chinese_novels", "chinese_poetry"} <= set(DATASETS)
    assert TINYSHAKESPEARE.files[0].remote_name == "input.txt"  # the mirror serves it plain
    served = _write(tmp_path / "served/input.txt", ENGLISH)
    digest = hashlib.sha256(ENGLISH.encode()).hexdigest()
    fake = dataclasses.replace(
        TINYSHAKESPEARE,
        files=(dataclasses.replace(TINYSHAKESPEARE.files[0], sha256=digest, size=len(ENGLISH)),),
    )
    with serve(served.parent) as url:
        target = download_dataset(fake, tmp_path / "root", mirrors=[url], progress=False)
    assert (target / "input.txt").read_text() == ENGLISH
    assert dataset_status(fake, tmp_path / "root").state == "present"


# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_unknown_characters():
    train, val = split_tokens(ENGLISH, 0.25)
    tok = CharTokenizer.train(train)
    assert tok.chars == "".join(sorted(set(train))) and tok.vocab_size == len(set(train))
    assert tok.decode(tok.encode(train)) == train
    assert tok.encode("aF") == [tok.chars.index("a"), tok.chars.index("F")]
    with pytest.raises(ValueError, match=r"2 characters are not in the vocabulary.*'Z' \(U\+005A\) x2.*'😀'"):
        tok.encode("ZZ 😀 a")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_bpe_round_trip_is_exact_and_training_is_cached(tmp_path):
    text = ENGLISH * 30 + "中文 text 😀\n"
    tok = BpeTokenizer.train(text, 300, cache=tmp_path)
    assert tok.kind == "bpe" and tok.vocab_size <= 300 and tok.name == f"bpe-{tok.vocab_size}"
    for t in [text, *HOSTILE]:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert min(ids) > 3  # subword's specials 0-3 never come out of ordinary text
    assert tok.encode(" hello") != tok.encode("hello")  # no prefix space added at encode time
    assert len(list(tmp_path.glob("bpe-*.json"))) == 1
    again = BpeTokenizer.train(text, 300, cache=tmp_path)
    assert again.to_json() == tok.to_json()


def _save_load(tok: TextTokenizer, path: Path, samples: list[str]) -> TextTokenizer:
    tok.save(path)
    back = load_text_tokenizer(path)
    assert type(back) is type(tok) and back.name == tok.name and back.vocab_size == tok.vocab_size
    assert back.to_json() == tok.to_json()
    for s in samples:
        assert back.encode(s) == tok.encode(s)
        assert back.decode(tok.encode(s)) == tok.decode(tok.encode(s))
    assert json.loads(path.read_text())["kind"] == tok.kind
    return back


def test_save_and_load_char_and_bpe(tmp_path):
    _save_load(CharTokenizer.train(ENGLISH), tmp_path / "run/char.json", [ENGLISH])
    _save_load(BpeTokenizer.train(ENGLISH * 10, 280, cache=tmp_path), tmp_path / "bpe.json", HOSTILE)
    assert isinstance(build_tokenizer("char", ENGLISH), CharTokenizer)
    with pytest.raises(ValueError, match="pass train_text"):
        build_tokenizer("bpe")
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'; choose from char, gpt2"):
        build_tokenizer("wordpiece")


def test_bad_tokenizer_files_are_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_text_tokenizer(tmp_path / "nothing.json")
    _write(tmp_path / "bad.json", "{broken")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_text_tokenizer(tmp_path / "bad.json")
    with pytest.raises(TokenizerError, match="not an llmlab text tokenizer"):
        tokenizer_from_json('{"model": {}}')
    good = json.loads(CharTokenizer.train("ab").to_json())
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'sentencepiece'"):
        tokenizer_from_json(json.dumps({**good, "kind": "sentencepiece"}))
    with pytest.raises(TokenizerError, match="damaged char tokenizer"):
        tokenizer_from_json(json.dumps({k: v for k, v in good.items() if k != "chars"}))


def test_gpt2_and_bert_files_missing_is_a_data_error(tmp_path):
    with pytest.raises(DataMissingError, match="tokenizers/gpt2/tokenizer.json.*huggingface.co"):
        Gpt2Tokenizer.load(tmp_path)
    with pytest.raises(DataMissingError, match="tokenizers/bert-base-chinese/vocab.txt"):
        build_tokenizer("bert-chinese", root=tmp_path)
    _write(tmp_path / "tokenizers/gpt2/tokenizer.json", '{"model": {"vocab": {}, "merges": []}}')
    with pytest.raises(DataCorruptError, match="not GPT-2's tokenizer"):
        Gpt2Tokenizer.load(tmp_path)


def test_bert_chinese_on_a_toy_vocab(tmp_path):
    vocab = ["[PAD]", *[f"[unused{i}]" for i in range(1, 100)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += ["，", "。", "你", "好", "hello", "world", "##s", "3", "kg", "cafe"]
    tok = BertChineseTokenizer.from_vocab(_write(tmp_path / "vocab.txt", "\n".join(vocab) + "\n"))
    ids = tok.encode("你好，Hello worlds！\n3 kg Café 你")
    assert tok.decode(ids) == f"你好，hello worlds{UNK_TEXT}3 kg cafe你"  # natural text, no spaces around CJK
    assert tok.decode([101, *tok.encode("你好"), 102, 0]) == "你好"  # [CLS] [SEP] [PAD] are not text
    back = _save_load(tok, tmp_path / "bert.json", ["你好，hello"])
    assert back.unk_id == 100
    bad = _write(tmp_path / "bad_vocab.txt", "\n".join(["a", "b"]))
    with pytest.raises(DataCorruptError, match="not a BERT vocabulary"):
        BertChineseTokenizer.from_vocab(bad)


# ---------------------------------------------------------------------------------------------------------
# Token streams
# ---------------------------------------------------------------------------------------------------------


class _Counting(CharTokenizer):
    calls = 0

    def encode(self, text):
        type(self).calls += 1
        return super().encode(text)


def test_token_memmap_dtype_cache_and_truncation(tmp_path):
    tok = _Counting(sorted(set(ENGLISH)))
    expected = np.array(tok.encode(ENGLISH), dtype=np.uint16)
    mm = token_memmap(ENGLISH, tok, cache=tmp_path)
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16 and np.array_equal(mm, expected)
    assert tok.calls == 2  # once for the cache, once just above
    (binf,) = tmp_path.glob("*.bin")
    meta = json.loads(binf.with_suffix(".json").read_text())
    assert meta["n_tokens"] == len(ENGLISH) and meta["dtype"] == "uint16"
    assert np.array_equal(np.fromfile(binf, dtype=np.uint16), expected)  # nanoGPT's raw format
    again = token_memmap(ENGLISH, tok, cache=tmp_path)
    assert tok.calls == 2 and np.array_equal(again, expected)  # reused, not tokenised again
    del mm, again  # (truncating a mapped file in place would pull the pages from under the maps)
    binf.write_bytes(binf.read_bytes()[:10])  # a truncated cache file
    assert np.array_equal(token_memmap(ENGLISH, tok, cache=tmp_path), expected) and tok.calls == 3
    binf.with_suffix(".json").unlink()  # a lost record
    assert np.array_equal(token_memmap(ENGLISH, tok, cache=tmp_path), expected) and tok.calls == 4
    token_memmap(ENGLISH[:-1], tok, cache=tmp_path)  # another text: another file
    token_memmap(ENGLISH, CharTokenizer(sorted(set(ENGLISH)) + ["#"]), cache=tmp_path)  # another tokenizer
    assert len(list(tmp_path.glob("*.bin"))) == 3
    big = CharTokenizer(chr(0x10000 + i) for i in range(70000))
    text = "".join(chr(0x10000 + i) for i in (0, 65535, 69999))
    wide = token_memmap(text, big, cache=tmp_path)
    assert wide.dtype == np.uint32 and list(wide) == [0, 65535, 69999]
    assert (
        Path(token_memmap("abc", CharTokenizer("abc")).filename).parent == lm_text.cache_dir() / "lm-tokens"
    )
    with pytest.raises(ValueError, match="empty"):
        token_memmap("", tok, cache=tmp_path)


def test_split_and_bytes_per_token():
    tokens = np.arange(1000)
    train, val = split_tokens(tokens, 0.1)
    assert len(train) == 900 and np.array_equal(np.concatenate([train, val]), tokens)
    assert np.shares_memory(train, tokens)  # views, not copies
    assert split_tokens("abcdefghij", 0.2) == ("abcdefgh", "ij")
    assert len(split_tokens(np.arange(1115394), 0.1)[0]) == 1003854  # nanoGPT's int(n * 0.9)
    with pytest.raises(ValueError, match="val_fraction"):
        split_tokens(tokens, 1.0)
    assert bytes_per_token("中文ab", 4) == 2.0
    with pytest.raises(ValueError, match="positive"):
        bytes_per_token("x", 0)


# ---------------------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------------------


def test_windows_shift_determinism_and_resume():
    tokens = np.arange(5000, dtype=np.uint16)
    loader = WindowLoader(tokens, block_size=16, batch_size=8, seed=3)
    assert len(loader) == 5000 // (8 * 16)
    batches = list(loader)
    for x, y in batches:
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # the window shifted by one (tokens are 0, 1, 2, ...)
        assert int(x[:, 0].min()) >= 0 and int(y[:, -1].max()) <= 4999
    same = WindowLoader(torch.from_numpy(tokens.astype(np.int64)), 16, 8, seed=3)  # a tensor, same windows
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, same, strict=True))
    resumed = list(loader.iter_from(5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, batches[5:], strict=True))
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], batches[0][0])
    assert not torch.equal(next(iter(WindowLoader(tokens, 16, 8, seed=4)))[0], batches[0][0])
    assert len(WindowLoader(tokens, 16, 8, steps_per_epoch=3)) == 3


def test_window_shares_add_up_to_the_global_batch():
    tokens = np.arange(3000)
    whole = WindowLoader(tokens, 10, 6, seed=7, device="cpu")
    shares = [WindowLoader(tokens, 10, 6, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shares, strict=True):
        assert x0.shape == (3, 10)
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    with pytest.raises(ValueError, match="divisible"):
        WindowLoader(tokens, 10, 5, world_size=2)


def test_eval_windows_cover_the_split_once():
    tokens = np.arange(1000)
    loader = WindowLoader(tokens, block_size=16, batch_size=5, shuffle=False)
    assert loader.num_windows == 62 and len(loader) == 13  # (1000 - 1) // 16 windows, the last batch of 2
    xs, ys = zip(*loader, strict=True)
    assert torch.equal(torch.cat(xs).flatten(), torch.arange(62 * 16))
    assert torch.equal(torch.cat(ys).flatten(), torch.arange(1, 62 * 16 + 1))  # each target once
    loader.set_epoch(3)
    assert torch.equal(torch.cat([x for x, _ in loader]), torch.cat(xs))  # the same every epoch
    parts = [WindowLoader(tokens, 16, 5, shuffle=False, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(
        torch.cat([torch.cat([a[1], b[1]]) for a, b in zip(*parts, strict=True)]), torch.cat(ys)
    )
    assert len(WindowLoader(tokens, 16, 5, shuffle=False, steps_per_epoch=4)) == 4
    with pytest.raises(ValueError, match="too few for one window"):
        WindowLoader(np.arange(16), 16, 1)


# ---------------------------------------------------------------------------------------------------------
# The shared data
# ---------------------------------------------------------------------------------------------------------


def test_real_tinyshakespeare_and_its_char_and_gpt2_tokens(shared_data, tmp_path):
    corpus = load_text("tinyshakespeare", shared_data)
    assert len(corpus.text) == 1115394 and "verified" in corpus.notes[0]
    train, val = split_tokens(corpus.text, 0.1)
    assert CharTokenizer.train(corpus.text).vocab_size == 65 == CharTokenizer.train(train).vocab_size
    gpt2 = build_tokenizer("gpt2", root=shared_data)
    assert gpt2.vocab_size == 50257 and gpt2.encode("Hello world<|endoftext|>") == [15496, 995, 50256]
    # the lab's copy has id 40559 renamed; restored from the merges
    assert gpt2.encode(" Claude") == [40559] and "ĠClaude" in gpt2.repairs[0]
    for text in [ENGLISH, *HOSTILE, corpus.text[:20000]]:
        assert gpt2.decode(gpt2.encode(text)) == text
    tokens = token_memmap(corpus.text, gpt2, cache=tmp_path)
    assert tokens.dtype == np.uint16 and len(tokens) == 338025  # nanoGPT's shakespeare: 301966 + 36059
    assert [len(s) for s in split_tokens(tokens, 0.1)] == [304222, 33803]
    assert 3.2 < bytes_per_token(corpus.text, len(tokens)) < 3.4
    back = _save_load(gpt2, tmp_path / "gpt2.json", [ENGLISH])
    assert back.repairs == gpt2.repairs


def test_real_chinese_sets_and_bert_chinese_round_trip(shared_data, tmp_path):
    novels = load_text("chinese_novels", shared_data)
    assert novels.notes[0].count(".txt") == 4 and novels.notes[0].startswith("sha256 of the content verified")
    assert len(novels.text) == 3022732 + 3 and "\r" not in novels.text
    assert all(s in TEXT_NAMES for s in NOVELS) and len(CHINESE_NOVELS.files) == 4
    assert dataset_status("chinese_novels", shared_data).state == "present"
    tang = load_text("tang_poems", shared_data)
    assert tang.text.count("\n") == 57603 - 1 and "\t" not in tang.text

    tok = build_tokenizer("bert-chinese", root=shared_data)
    assert tok.vocab_size == 21128 and tok.name == "bert-base-chinese"
    lines = [ln for ln in load_text("hongloumeng", shared_data).text.split("\n") if ln.strip()][:400]
    exact = unk = 0
    for line in lines:
        enc = tok.tok.encode(line, add_special_tokens=False)
        # Expected: every [UNK] piece (a CJK character, a curly quote, a mojibake word) becomes one U+FFFD,
        # all whitespace goes (and Latin case and accents); nothing else changes.
        kept, at = [], 0
        for i, (a, b) in zip(enc.ids, enc.offsets, strict=True):
            if i == tok.unk_id:
                kept += [line[at:a], UNK_TEXT]
                at = b
        assert tok.decode(enc.ids) == _normalise_for_check("".join(kept) + line[at:])
        unk += enc.ids.count(tok.unk_id)
        exact += tok.decode(enc.ids) == re.sub(r"\s", "", line)
    assert tok.decode(tok.encode("“你好”")) == f"{UNK_TEXT}你好{UNK_TEXT}"  # no curly quotes in the vocab
    _save_load(tok, tmp_path / "bert.json", lines[:20])
    # the ids are those of Hugging Face's tokenizer for this folder (its tokenizer_config.json applied)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(shared_data / "tokenizers/bert-base-chinese"))
    assert hf(lines[:100], add_special_tokens=False)["input_ids"] == [tok.encode(ln) for ln in lines[:100]]
