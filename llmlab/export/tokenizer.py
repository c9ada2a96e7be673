"""A language-model run's tokenizer (llmlab/data/lm_tokenizers.py) as Hugging Face tokenizer files:
tokenizer.json (the `tokenizers` library's format) + tokenizer_config.json + special_tokens_map.json, which
`transformers.AutoTokenizer.from_pretrained` loads as a `PreTrainedTokenizerFast` giving the same ids as
llmlab's `encode` (transformers' "Tokenizer" docs, https://huggingface.co/docs/transformers/main_classes/
tokenizer; the file format is `tokenizers`' `Tokenizer.to_str`).

- gpt2, bpe, bert-chinese, pretrained: the `tokenizers.Tokenizer` inside, as it is, less any post-processor
  that adds [CLS]/<s>-style tokens (a language model here is trained on a plain token stream, as llmlab's
  `encode` gives it, so `tokenizer(text)` must add nothing). Special tokens are declared to transformers only
  where llmlab's `encode` also matches them in a text (gpt2's <|endoftext|>, a pretrained tokenizer's added
  tokens); bpe's <pad> <s> </s> <unk> stay ids 0-3 of its vocabulary but are no longer matched as added
  tokens, since llmlab encodes the string "<s>" as the characters it is. bert-chinese gets BERT's WordPiece
  decoder: HF's `decode` then puts spaces between pieces, where llmlab's writes natural text (a difference
  the card states).
- char: a WordLevel vocabulary of the characters, a pre-tokenizer that isolates every character (so spaces
  and newlines are tokens like any other) and the Fuse decoder (pieces joined with nothing in between): ids
  and decoded text equal llmlab's. As llmlab's, it has no unknown token: a character outside the vocabulary
  is an error, not a silent id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# special-token roles transformers knows, by the token strings llmlab's tokenizers use
_ROLES = {
    "<|endoftext|>": ("bos_token", "eos_token", "unk_token"),
    "[UNK]": ("unk_token",),
    "[PAD]": ("pad_token",),
    "[CLS]": ("cls_token",),
    "[SEP]": ("sep_token",),
    "[MASK]": ("mask_token",),
    "<pad>": ("pad_token",),
    "<s>": ("bos_token",),
    "</s>": ("eos_token",),
    "<unk>": ("unk_token",),
}
_ADDING_PROCESSORS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")


def hf_tokenizer(tok: Any):
    """The `tokenizers.Tokenizer` equivalent to llmlab tokenizer `tok` (a copy: `tok` is not changed)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if tok.kind == "char":
        vocab = {c: i for i, c in enumerate(tok.chars)}
        out = Tokenizer(models.WordLevel(vocab, unk_token=None))
        out.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
        out.decoder = decoders.Fuse()
        return out
    inner = getattr(tok, "tok", None)
    if inner is None:
        raise ValueError(f"tokenizer kind {tok.kind!r} has no Hugging Face form")
    out = Tokenizer.from_str(inner.to_str())
    obj = json.loads(out.to_str())
    if (obj.get("post_processor") or {}).get("type") in _ADDING_PROCESSORS:
        obj["post_processor"] = None
    if tok.kind == "bpe":
        obj["added_tokens"] = []  # still in the BPE vocabulary (ids 0-3), never matched in a text
    out = Tokenizer.from_str(json.dumps(obj, ensure_ascii=False))
    if tok.kind == "bert-chinese" and obj.get("decoder") is None:
        out.decoder = decoders.WordPiece(prefix="##")
    return out


def special_tokens(hf_tok: Any) -> dict[str, str]:
    """{"eos_token": "<|endoftext|>", ...}: the roles of the special tokens the tokenizer matches in text."""
    roles: dict[str, str] = {}
    added = {t.content for t in hf_tok.get_added_tokens_decoder().values() if t.special}
    for token, names in _ROLES.items():
        if token in added:
            for name in names:
                roles.setdefault(name, token)
    return roles


def save_hf_tokenizer(tok: Any, folder: Path, model_max_length: int) -> dict[str, int | None]:
    """Write `tok` (an llmlab text tokenizer) as HF tokenizer files into `folder`; returns the ids of its
    bos / eos / pad tokens (None where it has none), for the model's config.json."""
    hf_tok = hf_tokenizer(tok)
    hf_tok.save(str(folder / "tokenizer.json"))
    specials = special_tokens(hf_tok)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(model_max_length),
        "clean_up_tokenization_spaces": False,  # decode must give the text back, not "cleaned" spacing
        "add_bos_token": False,
        "add_eos_token": False,
        "llmlab_tokenizer": tok.name,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")
    ids = {name: hf_tok.token_to_id(token) for name, token in specials.items()}
    return {f"{role}_token_id": ids.get(f"{role}_token") for role in ("bos", "eos", "pad")}
