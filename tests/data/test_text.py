"""Text pipeline: cleaning and tokenising, the vocabulary (order, limits, truncation, JSON), encode_corpus."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.data.store import cache_dir
from llmlab.data.text import TRUNCATIONS, Vocab, clean_text, encode_corpus, tokenize, truncate


def test_clean_text():
    s = "Great  MOVIE!<br /><br />Loved it.<BR/>Really<br>\n\tyes "
    assert clean_text(s) == "great movie! loved it. really yes"
    assert clean_text("a<br  />b") == "a b"


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("I didn't like it... Was it 'good'? NO!!!", "i didn't like it was it good ? no ! ! !"),
        ("7/10, well-made; rock'n'roll (1950s)", "7 10 well made rock'n'roll 1950s"),
        ("the students' café’s <br />Best", "the students café's best"),
        ("a_b -- & * ; : \" ' ", "a b"),
        ("", ""),
    ],
)
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens.split()


def test_tokenize_agrees_with_the_cleaned_text():
    s = "Wow!<br /><br />  It’s   GREAT?"
    assert tokenize(s) == tokenize(clean_text(s)) == ["wow", "!", "it's", "great", "?"]


CORPUS = [["b", "a", "c", "a"], ["c", "d", "a", "b"], ["e", "c"]]  # a:3 c:3 b:2 d:1 e:1


def test_vocab_order_specials_and_determinism():
    v = Vocab.build(CORPUS)
    assert v.itos == ["<pad>", "<unk>", "a", "c", "b", "d", "e"]  # by frequency, ties alphabetical
    assert (v.pad_id, v.unk_id, v["<pad>"], v["<unk>"]) == (0, 1, 0, 1)
    assert v.counts == [0, 0, 3, 3, 2, 1, 1] and len(v) == 7
    assert Vocab.build(reversed(CORPUS)) == v  # corpus order does not matter
    assert v["zzz"] == 1 and "a" in v and "zzz" not in v


def test_vocab_min_freq_max_size_and_stats():
    v = Vocab.build(CORPUS, min_freq=2)
    assert v.itos == ["<pad>", "<unk>", "a", "c", "b"]
    capped = Vocab.build(CORPUS, max_size=4)  # the specials count towards max_size
    assert capped.itos == ["<pad>", "<unk>", "a", "c"]
    st = capped.stats()
    assert st["size"] == 4 and st["train_tokens"] == 10 and st["train_types"] == 5
    assert st["train_coverage"] == pytest.approx(0.6) and st["train_unk_rate"] == pytest.approx(0.4)
    assert capped.coverage([["a", "x"], ["c", "c"]]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="min_freq"):
        Vocab.build(CORPUS, min_freq=0)
    with pytest.raises(ValueError, match="no room"):
        Vocab.build(CORPUS, max_size=1)


def test_custom_specials_never_counted():
    v = Vocab.build([["<pad>", "x", "<bos>"]], specials=("<pad>", "<unk>", "<bos>"))
    assert v.itos == ["<pad>", "<unk>", "<bos>", "x"] and v.stats()["train_tokens"] == 1


def test_encode_truncation_modes_and_decode():
    tokens = [str(i) for i in range(10)]
    v = Vocab.build([tokens])
    ids = v.encode(tokens)
    assert v.decode(ids) == tokens
    assert v.decode(v.encode(tokens, 4, "head")) == ["0", "1", "2", "3"]
    assert v.decode(v.encode(tokens, 4, "tail")) == ["6", "7", "8", "9"]
    assert v.decode(v.encode(tokens, 8, "head+tail")) == ["0", "1", "4", "5", "6", "7", "8", "9"]
    assert v.decode(v.encode(tokens, 20, "head+tail")) == tokens  # short enough: unchanged
    assert v.encode(["0", "new"]) == [v["0"], 1]
    assert v.decode([v["3"], 0, 0]) == ["3"] and v.decode([0], skip_pad=False) == ["<pad>"]
    assert truncate(list(range(400 + 7)), 400, "head+tail")[:100] == list(range(100))  # a quarter of head
    with pytest.raises(ValueError, match="truncation"):
        v.encode(tokens, 4, "middle")


def test_json_round_trip_is_atomic(tmp_path):
    v = Vocab.build(CORPUS, min_freq=1, max_size=6)
    path = v.to_json(tmp_path / "run" / "vocab.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["vocab.json"]  # no temp file left behind
    back = Vocab.from_json(path)
    assert back == v and back.stats() == v.stats() and back.max_size == 6
    assert json.loads(path.read_text())["itos"][:2] == ["<pad>", "<unk>"]
    path.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a valid vocab"):
        Vocab.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable vocab"):
        Vocab.from_json(path)


TEXTS = ["A good film!", "Bad.<br />Very bad, bad film", "", "good good good good good good"]


def test_encode_corpus_shapes_padding_and_lengths():
    vocab = Vocab.build([tokenize(TEXTS[1]), ["good", "!"]])  # no "a"
    tokens, lengths = encode_corpus(TEXTS, vocab, max_len=5)
    assert tokens.dtype == lengths.dtype == torch.int64 and tokens.shape == (4, 5)
    assert lengths.tolist() == [4, 5, 0, 5]
    for i, text in enumerate(TEXTS):
        n = int(lengths[i])
        assert tokens[i, :n].tolist() == vocab.encode(tokenize(text), 5)
        assert not tokens[i, n:].any()  # right-padded with <pad> = 0
    assert tokens[0].tolist() == [1, vocab["good"], vocab["film"], vocab["!"], 0]  # "a" is not in the vocab
    # pre-tokenised input gives the same tensors
    same = encode_corpus([tokenize(t) for t in TEXTS], vocab, max_len=5)
    assert torch.equal(same[0], tokens) and torch.equal(same[1], lengths)


@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_encode_corpus_truncation(truncation):
    text = " ".join(f"w{i}" for i in range(10))
    vocab = Vocab.build([tokenize(text)])
    tokens, lengths = encode_corpus([text], vocab, 4, truncation)
    assert lengths.tolist() == [4]
    assert vocab.decode(tokens[0].tolist()) == truncate(tokenize(text), 4, truncation)
    with pytest.raises(ValueError, match="max_len"):
        encode_corpus([text], vocab, 0)


def test_encode_corpus_cache(recwarn):
    vocab = Vocab.build([tokenize(t) for t in TEXTS])
    first = encode_corpus(TEXTS, vocab, 3, "tail", cache=True)
    files = sorted((cache_dir() / "text").glob("encoded-*.npz"))
    assert files
    again = encode_corpus(TEXTS, vocab, 3, "tail", cache=True)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    # another setting, corpus or vocab is another key
    other = encode_corpus(TEXTS, vocab, 3, "head", cache=True)
    assert len(sorted((cache_dir() / "text").glob("encoded-*.npz"))) == len(files) + 1
    assert not torch.equal(other[0], first[0])
    # a damaged cache file is ignored with a warning and rebuilt
    newest = max((cache_dir() / "text").glob("encoded-*.npz"), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(b"garbage")
    rebuilt = encode_corpus(TEXTS, vocab, 3, "head", cache=True)
    assert torch.equal(rebuilt[0], other[0])
    assert any("damaged encoded-text cache" in str(w.message) for w in recwarn)
