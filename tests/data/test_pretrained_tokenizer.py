"""The "pretrained" tokenizer kind (llmlab/data/lm_tokenizers.py): an HF model directory's tokenizer.json, or
GPT-2's vocab.json + merges.txt, used as it is, saved with a run and restored from it."""

from __future__ import annotations

import pytest

from llmlab.data.lm_tokenizers import PretrainedTokenizer, load_text_tokenizer
from llmlab.data.store import DataCorruptError

TEXT = "却说天下大势，分久必合，合久必分。\nThe king spoke: <|endoftext|> and then 山月。"


def _trained(tmp_path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 20], trainer)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    tok.model.save(str(tmp_path))
    return tok


def test_tokenizer_json_and_slow_files_agree_and_round_trip(tmp_path):
    ref = _trained(tmp_path)
    fast = PretrainedTokenizer.from_file(tmp_path / "tokenizer.json")
    assert fast.encode(TEXT) == ref.encode(TEXT, add_special_tokens=False).ids
    assert fast.decode(fast.encode(TEXT)) == TEXT
    assert fast.encode("<|endoftext|>") == [ref.token_to_id("<|endoftext|>")]
    slow = PretrainedTokenizer.from_bpe_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    plain = TEXT.replace("<|endoftext|>", "")  # the slow files know nothing of the added token
    assert slow.encode(plain) == fast.encode(plain)
    assert slow.decode(slow.encode(plain)) == plain
    fast.save(tmp_path / "saved.json")
    again = load_text_tokenizer(tmp_path / "saved.json")
    assert isinstance(again, PretrainedTokenizer) and again.encode(TEXT) == fast.encode(TEXT)
    assert again.name == fast.name and fast.name.startswith(f"pretrained-{fast.vocab_size}")


def test_damaged_files_are_data_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataCorruptError, match="not a usable tokenizer.json"):
        PretrainedTokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(DataCorruptError, match="not a byte-level BPE"):
        PretrainedTokenizer.from_bpe_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
