"""A joint subword vocabulary for translation: byte-level BPE trained with Hugging Face `tokenizers`.

Byte-pair encoding (Sennrich, Haddow & Birch 2016, "Neural Machine Translation of Rare Words with Subword
Units") starts from characters and repeatedly merges the most frequent adjacent pair into a new symbol until
the vocabulary has the requested size: frequent words become one token, rare ones split into pieces, and no
word is out of vocabulary. "Byte-level" (GPT-2, Radford et al. 2019) runs BPE over the UTF-8 bytes of each
word, with all 256 bytes in the base alphabet: any text at all can be encoded (emoji, a Chinese name in an
English sentence), and decoding gives the text back exactly — what sacreBLEU must score.

One vocabulary for both languages ("joint", as in the Transformer paper's 37k shared BPE for en-de): English
and German share names, numbers and many subwords, and it lets the model share one embedding matrix between
encoder, decoder and output layer. It is trained on the TRAINING split only (both sides), saved with the run
as a standard `tokenizer.json` that `tokenizers.Tokenizer.from_file` (and `transformers`'
`PreTrainedTokenizerFast(tokenizer_file=...)`) load.

Special tokens, at fixed ids: <pad> 0, <s> 1 (BOS, starts every target), </s> 2 (EOS, ends every source and
target), <unk> 3 (never produced by byte-level BPE; kept so the id layout is the conventional one).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from llmlab.fileio import atomic_write_text

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "SPECIALS",
    "TokenizerError",
    "decode",
    "encode",
    "load_tokenizer",
    "save_tokenizer",
    "train_bpe",
]


class TokenizerError(ValueError):
    """A tokenizer file that is missing, corrupt or not one of ours (special tokens at other ids)."""


def train_bpe(texts: Sequence[str], vocab_size: int, min_frequency: int = 2, cache: Path | None = None):
    """A byte-level BPE `tokenizers.Tokenizer` with `vocab_size` entries at most, trained on `texts`.

    Deterministic for the same texts and settings. With `cache` (a folder), the result is stored there under
    a digest of the texts and settings and reused by later runs (training takes a few seconds on Multi30k)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIALS) + 256:
        raise ValueError(f"vocab_size={vocab_size} is below the 260 entries of the byte alphabet + specials")
    path = None
    if cache is not None:
        h = hashlib.sha256(f"bpe-v1|{vocab_size}|{min_frequency}|".encode())
        for t in texts:
            h.update(t.encode("utf-8") + b"\x00")
        path = Path(cache) / f"bpe-{h.hexdigest()[:24]}.json"
        if path.is_file():
            try:
                return load_tokenizer(path)
            except TokenizerError:
                pass  # a damaged cache entry is retrained and replaced
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    _check_specials(tok, "the trained tokenizer")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tokenizer(tok, path)
    return tok


def save_tokenizer(tok, path: Path) -> None:
    """tokenizer.json, written atomically."""
    atomic_write_text(path, tok.to_str(pretty=False))


def load_tokenizer(path: Path):
    """A tokenizer.json written by `save_tokenizer`; TokenizerError when missing, corrupt or foreign."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
        tok = Tokenizer.from_str(text)
    except (OSError, UnicodeDecodeError, ValueError, Exception) as err:  # tokenizers raises plain Exception
        raise TokenizerError(f"tokenizer file {path} is corrupt: {err}") from err
    _check_specials(tok, str(path))
    return tok


def _check_specials(tok, where: str) -> None:
    found = [tok.token_to_id(s) for s in SPECIALS]
    if found != list(range(len(SPECIALS))):
        raise TokenizerError(
            f"{where}: special tokens {', '.join(SPECIALS)} must have ids 0-3, found {found}"
        )


def encode(tok, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, never a special token: `tokenizers` turns the strings "<pad>", "</s>", ...
    found in a text into their special ids (so a user typing "</s>" would end the source, and "<pad>" would
    be masked out as padding); such texts go through the pre-tokenizer and the BPE model directly, which
    treats them as the ordinary characters they are. Other texts take the fast batched path (same ids)."""
    out = [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    for i, text in enumerate(texts):
        if any(s in text for s in SPECIALS):
            pieces = tok.pre_tokenizer.pre_tokenize_str(text)
            out[i] = [t.id for piece, _ in pieces for t in tok.model.tokenize(piece)]
    return out


def decode(tok, ids: Sequence[Sequence[int]]) -> list[str]:
    """Texts of token-id lists, special tokens dropped; byte-level decoding restores the exact text, up to
    the space the pre-tokenizer puts in front (stripped)."""
    return [t.strip() for t in tok.decode_batch([list(i) for i in ids], skip_special_tokens=True)]
