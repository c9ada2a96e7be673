"""llmlab.data.subword: the joint byte-level BPE — fixed special ids, exact round trip of any text (what BLEU
on detokenised output needs), deterministic training, the cache, and clear errors for bad files."""

from __future__ import annotations

import json

import pytest

from llmlab.data.subword import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TokenizerError,
    decode,
    encode,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)

TEXTS = [
    "A man in an orange hat starring at something.",
    "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.",
    "Two young, White males are outside near many bushes.",
    "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
] * 20


def test_round_trip_of_any_text_and_special_ids(tmp_path):
    tok = train_bpe(TEXTS, vocab_size=400, min_frequency=1)
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert tok.get_vocab_size() <= 400
    hostile = ["Zwei Männer über 😀 中文 «quoted» \t tab", "", "   ", "!!??", "a </s> b <pad> <s><unk>"]
    for text in TEXTS[:4] + hostile:
        (ids,) = encode(tok, [text])
        assert all(i > 3 for i in ids)  # no special token inside ordinary text
        assert decode(tok, [ids]) == [text.strip()]


def test_training_is_deterministic_and_cached(tmp_path):
    a = train_bpe(TEXTS, 350, cache=tmp_path)
    cached = list(tmp_path.glob("bpe-*.json"))
    assert len(cached) == 1
    b = train_bpe(TEXTS, 350, cache=tmp_path)  # from the cache
    c = train_bpe(TEXTS, 350)  # trained again
    assert a.to_str() == b.to_str() == c.to_str()
    cached[0].write_text("{broken")  # a damaged cache entry is retrained, not an error
    assert train_bpe(TEXTS, 350, cache=tmp_path).to_str() == a.to_str()


def test_saved_file_loads_in_tokenizers_and_bad_files_are_clear_errors(tmp_path):
    from tokenizers import Tokenizer

    tok = train_bpe(TEXTS, 320)
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    assert Tokenizer.from_file(str(path)).encode("Ein Mann").ids == tok.encode("Ein Mann").ids
    assert load_tokenizer(path).to_str() == tok.to_str()
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="corrupt"):
        load_tokenizer(tmp_path / "bad.json")
    data = json.loads(path.read_text())
    for entry in data["added_tokens"]:
        entry["id"] = {0: 1, 1: 0}.get(entry["id"], entry["id"])
    data["model"]["vocab"]["<pad>"], data["model"]["vocab"]["<s>"] = 1, 0
    (tmp_path / "swapped.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="special tokens"):
        load_tokenizer(tmp_path / "swapped.json")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(TEXTS, 100)


def test_the_path_for_texts_with_special_strings_gives_the_ids_of_the_fast_path():
    tok = train_bpe(TEXTS, vocab_size=400, min_frequency=1)
    for text in TEXTS[:4]:
        pieces = tok.pre_tokenizer.pre_tokenize_str(text)
        slow = [t.id for piece, _ in pieces for t in tok.model.tokenize(piece)]
        assert slow == encode(tok, [text])[0]
    # "</s>" inside a text is three ordinary pieces, so the source does not end there.
    (ids,) = encode(tok, ["a man </s> a dog"])
    assert EOS_ID not in ids and PAD_ID not in ids
