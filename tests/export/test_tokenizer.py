"""Every kind of language-model tokenizer becomes HF tokenizer files that `AutoTokenizer` loads with llmlab's
ids and (but for bert-chinese's spacing) its decoding: char and bpe built here, gpt2 and bert-chinese from
the data root."""

from __future__ import annotations

import pytest

from llmlab.data.lm_tokenizers import build_tokenizer
from llmlab.export.tokenizer import save_hf_tokenizer

TEXT = "Hello world! The king spoke.\n  Two  spaces,\ttabs; <s> odd </s> 3 kg, 却说 “引号” end"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_built_tokenizers(tmp_path, kind):
    from transformers import AutoTokenizer

    tok = build_tokenizer(kind, TEXT * 30, vocab_size=300, cache=tmp_path / "cache")
    assert save_hf_tokenizer(tok, tmp_path, 64) == {"bos_token_id": None, "eos_token_id": None,
                                                    "pad_token_id": None}  # fmt: skip
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ids = hf(TEXT)["input_ids"]
    assert ids == tok.encode(TEXT)  # "<s>" too: characters, as llmlab encodes them
    assert hf.decode(ids) == tok.decode(ids) == TEXT


def test_char_vocabulary_has_no_unknown_token(tmp_path):
    from transformers import AutoTokenizer

    save_hf_tokenizer(build_tokenizer("char", "abc "), tmp_path, 8)
    with pytest.raises(Exception, match="UNK|unk|Missing"):
        AutoTokenizer.from_pretrained(tmp_path)("abz")


@pytest.mark.parametrize("kind", ["gpt2", "bert-chinese"])
def test_data_root_tokenizers(shared_data, tmp_path, kind):
    from transformers import AutoTokenizer

    tok = build_tokenizer(kind, root=shared_data)
    ids = save_hf_tokenizer(tok, tmp_path, 1024)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = TEXT + " <|endoftext|> next"
    assert hf(text)["input_ids"] == tok.encode(text)
    if kind == "gpt2":
        assert ids["eos_token_id"] == 50256 and hf.eos_token == "<|endoftext|>"
        assert hf.decode(tok.encode(text)) == text
