"""Tokenizers for language models behind one small interface, each saved to (and restored from) one JSON file.

`TextTokenizer`: `name`, `vocab_size`, `encode(str) -> list[int]`, `decode(ids) -> str`, `save(path)`;
`load_text_tokenizer(path)` restores any kind from its file, so a run directory carries its tokenizer and a
later process (evaluation, sampling, serving) decodes with exactly the same one. Four kinds:

- "char" (`CharTokenizer`): one id per character, the sorted set of characters of the text it is trained on,
  as in nanoGPT's shakespeare_char (Karpathy; data/shakespeare_char/prepare.py), which uses the whole text.
  llmlab's LM recipe does the same (llmlab/recipes/gpt_lm.py says why: a vocabulary of the training part alone
  has no id for a rare character first seen in validation). A character the vocabulary lacks (e.g. in a
  prompt) is a clear ValueError naming it, never a silent id. On TinyShakespeare the first 90% already holds
  all 65 characters.
- "gpt2" (`Gpt2Tokenizer`): GPT-2's byte-level BPE (Radford et al. 2019), read from
  `tokenizers/gpt2/tokenizer.json` under the data root (the Hugging Face file): 50257 tokens, `<|endoftext|>`
  = 50256. As Hugging Face's GPT2TokenizerFast does, the text "<|endoftext|>" encodes to that one id (how
  documents are separated). Round trip is exact for any text. The vocabulary is checked against the merges
  that define it, and a damaged entry is restored: the lab's copy has one (see `Gpt2Tokenizer.load`).
- "bert-chinese" (`BertChineseTokenizer`): the WordPiece vocabulary of Google's Chinese BERT
  (`tokenizers/bert-base-chinese/vocab.txt`, 21128 entries), the vocabulary Chinese GPT-2 models such as
  uer/gpt2-chinese use. The pipeline is Hugging Face's BertTokenizerFast with the settings of that model's
  tokenizer_config.json (do_lower_case true, tokenize_chinese_chars true, strip_accents unset, i.e. stripped
  because lower-casing is on): BertNormalizer (control characters dropped, every whitespace becomes a space,
  spaces put around each CJK character, lower case, accents stripped), BertPreTokenizer (split on whitespace
  and punctuation), WordPiece with `##` continuations and [UNK]. The ids equal those of
  `transformers.AutoTokenizer.from_pretrained` on that folder (checked in the tests), without [CLS]/[SEP]:
  a language model gets a plain stream. `decode` gives natural text rather than BERT's
  space-separated tokens: `##` pieces join their word, a space is put only between two pieces that both
  touch a letter or digit outside the CJK blocks ("hello world", "3 kg"), nowhere else; [UNK] decodes to
  U+FFFD, other special tokens to nothing. What a round trip loses, by construction: all whitespace
  (newlines, the novels' paragraph indents, U+3000 ideographic spaces, tabs) and spacing around Latin
  punctuation; upper case and accents of Latin letters; a character outside the vocabulary (a rare CJK
  character, an emoji) becomes U+FFFD, and a Latin word holding one becomes a single U+FFFD. Measured on the
  four novels (3022732 characters with LF line ends; tests/data/test_lm_text.py checks the line-level
  claims): the 88649 whitespace characters (2.9%) are dropped; 88651 of the 2934083 others (3.0%)
  come back as U+FFFD (88630 [UNK] tokens), above all because the vocabulary lacks the curly quotes
  “ ” ‘ ’ (78763 of them), the em dash, the ellipsis and "`" (1692); the remaining 8196 are
  1181 distinct rare CJK characters (e.g. 迳 郃 搠) and mojibake; lower-casing and accent
  stripping change 15 more (mojibake: Latin and Cyrillic capitals, kana whose voicing mark is stripped).
  Whoever needs the quotes can map them to ASCII before encoding, or use the "bpe" kind, which loses nothing.
- "bpe" (`BpeTokenizer`): a byte-level BPE trained on the training text with llmlab.data.subword.train_bpe
  (vocabulary size a parameter, result cached in `cache_dir()/lm-bpe/`). The training text is given to the
  trainer whole, and encoding uses the same pre-tokenizer without the prefix space train_bpe adds at the
  start of each text, so that "hello" and " hello" stay different and the round trip is exact for any text;
  the special tokens of subword (<pad>, <s>, </s>, <unk> at 0-3) stay in the vocabulary, and their strings in
  a text encode as the ordinary characters they are.

A fifth kind is only read, never built from a name: "pretrained" (`PretrainedTokenizer`), the tokenizer of a
pretrained Hugging Face model directory used as it is (`tokenizer.json`, or GPT-2's `vocab.json` +
`merges.txt` as a byte-level BPE), what `gpt-finetune init_from=HF_DIR` trains with (llmlab/recipes/
gpt_finetune.py); encoding adds no special tokens, decoding keeps them.
"""

from __future__ import annotations

import json
import unicodedata
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from llmlab.data.store import DataCorruptError, DataMissingError, cache_dir, data_root_source
from llmlab.data.subword import TokenizerError, train_bpe
from llmlab.data.subword import encode as _subword_encode
from llmlab.fileio import atomic_write_text

FORMAT = "llmlab-text-tokenizer"
FORMAT_VERSION = 1
KINDS = ("char", "gpt2", "bert-chinese", "bpe")  # what build_tokenizer makes (files also hold "pretrained")

GPT2_FILE = "tokenizers/gpt2/tokenizer.json"
GPT2_VOCAB_SIZE = 50257
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_SOURCE = "https://huggingface.co/openai-community/gpt2 (tokenizer.json)"

BERT_CHINESE_FILE = "tokenizers/bert-base-chinese/vocab.txt"
BERT_CHINESE_VOCAB_SIZE = 21128
BERT_CHINESE_SOURCE = "https://huggingface.co/google-bert/bert-base-chinese (vocab.txt)"
BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
UNK_TEXT = "\ufffd"  # what [UNK] decodes to: the Unicode replacement character, one per lost piece

__all__ = [
    "BertChineseTokenizer",
    "BpeTokenizer",
    "CharTokenizer",
    "Gpt2Tokenizer",
    "KINDS",
    "PretrainedTokenizer",
    "TextTokenizer",
    "TokenizerError",
    "build_tokenizer",
    "load_text_tokenizer",
    "tokenizer_from_json",
]


# ---------------------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------------------


class TextTokenizer(ABC):
    """text <-> token ids, saved as one JSON file `{"format", "version", "kind", ...}` (see `to_json`)."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def name(self) -> str:
        """A short description for records, e.g. "char-65", "gpt2", "bert-base-chinese", "bpe-4096"."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids: every id `encode` gives is in range(vocab_size)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def _payload(self) -> dict[str, Any]:
        """What `from_payload` needs to rebuild this tokenizer (JSON-able)."""

    @classmethod
    @abstractmethod
    def from_payload(cls, payload: dict[str, Any]) -> TextTokenizer: ...

    def to_json(self) -> str:
        """The saved form: canonical JSON (sorted keys, no spaces), the same string for the same tokenizer."""
        obj = {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind, **self._payload()}
        return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    def save(self, path: str | Path) -> Path:
        """Write `to_json()` to `path` atomically; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.to_json())
        return path

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{self.name}: token ids out of range(0, {self.vocab_size}): {bad[:10]}")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def tokenizer_from_json(text: str, where: str = "tokenizer JSON") -> TextTokenizer:
    """Rebuild a tokenizer of any kind from `to_json()` output; TokenizerError when it is not one."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise TokenizerError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise TokenizerError(f'{where} is not an llmlab text tokenizer (no "format": {FORMAT!r})')
    if obj.get("version") != FORMAT_VERSION:
        raise TokenizerError(
            f"{where}: format version {obj.get('version')!r}, this llmlab reads {FORMAT_VERSION}"
        )
    kind = obj.get("kind")
    if kind not in _CLASSES:
        raise TokenizerError(f"{where}: unknown tokenizer kind {kind!r}; known kinds: {', '.join(_CLASSES)}")
    try:
        return _CLASSES[kind].from_payload(obj)
    except TokenizerError:
        raise
    except Exception as e:  # a damaged payload (missing key, bad HF JSON): one clear error
        raise TokenizerError(f"{where}: damaged {kind} tokenizer ({type(e).__name__}: {e})") from e


def load_text_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer saved at `path` by `TextTokenizer.save`, whatever its kind."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"tokenizer file {path} cannot be read: {e}") from e
    return tokenizer_from_json(text, f"tokenizer file {path}")


def build_tokenizer(
    kind: str,
    train_text: str | None = None,
    *,
    vocab_size: int = 4096,
    root: str | Path | None = None,
    cache: str | Path | None = None,
) -> TextTokenizer:
    """A tokenizer of `kind`: "char" and "bpe" are built from `train_text` (the training split), "bpe" with
    `vocab_size` entries at most (cached under `cache`, default `cache_dir()/lm-bpe`); "gpt2" and
    "bert-chinese" are read from the data root (`root` > LLMLAB_DATA > ~/.cache/llmlab)."""
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose from {', '.join(KINDS)}")
    if kind in ("char", "bpe"):
        if train_text is None:
            raise ValueError(f"a {kind!r} tokenizer is built from the training text: pass train_text")
        if kind == "char":
            return CharTokenizer.train(train_text)
        return BpeTokenizer.train(train_text, vocab_size, cache=cache)
    if kind == "gpt2":
        return Gpt2Tokenizer.load(root)
    return BertChineseTokenizer.load(root)


# ---------------------------------------------------------------------------------------------------------
# char
# ---------------------------------------------------------------------------------------------------------


class CharTokenizer(TextTokenizer):
    """One id per character of a fixed, sorted character set (see the module docstring)."""

    kind = "char"

    def __init__(self, chars: str | Iterable[str]) -> None:
        chars = sorted(set(chars))
        if not chars or any(len(c) != 1 for c in chars):
            raise ValueError("a char tokenizer needs a non-empty set of single characters")
        self.chars = "".join(chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        """The vocabulary of `text` (pass the training split; see the module docstring)."""
        if not text:
            raise ValueError("cannot build a char vocabulary from empty text")
        return cls(set(text))

    @property
    def name(self) -> str:
        return f"char-{len(self.chars)}"

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            unknown = Counter(c for c in text if c not in stoi)
            shown = ", ".join(f"{c!r} (U+{ord(c):04X}) x{n}" for c, n in unknown.most_common(20))
            more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
            raise ValueError(
                f"{self.name}: {len(unknown)} characters are not in the vocabulary (built from the training "
                f"text): {shown}{more}. Build the vocabulary from text that has them, or clean the input."
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in self._check_ids(ids))

    def _payload(self) -> dict[str, Any]:
        return {"chars": self.chars}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> CharTokenizer:
        return cls(payload["chars"])


# ---------------------------------------------------------------------------------------------------------
# Hugging Face `tokenizers` models: gpt2, bert-chinese, bpe
# ---------------------------------------------------------------------------------------------------------


def _hf_from_obj(obj: Any):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(obj, ensure_ascii=False))


class _HfTokenizer(TextTokenizer):
    """A `tokenizers.Tokenizer` inside; saved as its JSON object under "tokenizer"."""

    def __init__(self, tok) -> None:
        self.tok = tok

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def _payload(self) -> dict[str, Any]:
        return {"tokenizer": json.loads(self.tok.to_str())}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]):
        return cls(_hf_from_obj(payload["tokenizer"]))


def _tokenizer_file(rel: str, root: str | Path | None, kind: str, source: str) -> Path:
    root_path, root_source = data_root_source(root)
    path = root_path / rel
    if not path.is_file():
        raise DataMissingError(
            f"the {kind!r} tokenizer needs {rel} under the data root {root_path} (from {root_source}); "
            f"looked at {path}. Source: {source}; the lab's copy is described in the data MANIFEST, "
            "section 8. To fix: put the file there, or point LLMLAB_DATA (or --data-dir) at a folder that "
            "has it.",
            dataset=kind,
            missing=[rel],
            root=root_path,
        )
    return path


class Gpt2Tokenizer(_HfTokenizer):
    """GPT-2's byte-level BPE from the Hugging Face tokenizer.json (see the module docstring).

    `repairs` lists vocabulary entries restored on load (see `load`); it is saved with the tokenizer.
    """

    kind = "gpt2"
    eot_id = GPT2_EOT_ID

    def __init__(self, tok, repairs: Sequence[str] = ()) -> None:
        super().__init__(tok)
        self.repairs = list(repairs)

    @classmethod
    def load(cls, root: str | Path | None = None) -> Gpt2Tokenizer:
        """From `tokenizers/gpt2/tokenizer.json` under the data root; DataMissingError when absent,
        DataCorruptError when it is not GPT-2's.

        GPT-2's vocabulary is built from its merges: ids 0-255 are the byte symbols, merge k makes id 256 + k,
        and <|endoftext|> is 50256. That is checked, and a few entries that break it are restored from the
        merges (recorded in `repairs`): the lab's copy (MANIFEST section 8) had id 40559 "ĠClaude" replaced
        by "ĠLLMProvider", in tokenizer.json and vocab.json alike (a find-and-replace in its source
        repository), which made the file unloadable and would have mis-tokenised " Claude". A model section
        without "type" (written by old `tokenizers` releases) is read as BPE.
        """
        from tokenizers import Tokenizer

        path = _tokenizer_file(GPT2_FILE, root, "gpt2", GPT2_SOURCE)
        try:
            obj = json.loads(path.read_bytes().decode("utf-8"))
            model = obj["model"]
            model.setdefault("type", "BPE")
            repairs = _restore_gpt2_vocab(model, path)
            tok = Tokenizer.from_str(json.dumps(obj, ensure_ascii=False))
        except DataCorruptError:
            raise
        except Exception as e:  # bad JSON, a missing section; tokenizers raises plain Exception
            raise DataCorruptError(
                f"{path}: not a usable tokenizer.json ({type(e).__name__}: {e}). Replace it with the file "
                f"from {GPT2_SOURCE}.",
                path=path,
            ) from e
        return cls(tok, repairs)

    @property
    def name(self) -> str:
        return "gpt2"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(self._check_ids(ids), skip_special_tokens=False)

    def _payload(self) -> dict[str, Any]:
        return {**super()._payload(), "repairs": self.repairs}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Gpt2Tokenizer:
        return cls(_hf_from_obj(payload["tokenizer"]), payload.get("repairs", []))


_MAX_REPAIRS = 16  # more broken entries than this: not GPT-2's vocabulary, not a damaged copy of it


def _restore_gpt2_vocab(model: dict[str, Any], path: Path) -> list[str]:
    """Check GPT-2's vocabulary against its merges (merge k makes id 256 + k) and restore the entries that
    break it, in place; returns what was restored. DataCorruptError when it is not GPT-2's vocabulary."""
    vocab: dict[str, int] = model["vocab"]
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
    by_id = {i: t for t, i in vocab.items()}

    def corrupt(why: str) -> DataCorruptError:
        return DataCorruptError(
            f"{path}: not GPT-2's tokenizer ({why}). Replace it with the file from {GPT2_SOURCE}.", path=path
        )

    if len(vocab) != GPT2_VOCAB_SIZE or len(merges) != GPT2_EOT_ID - 256:
        raise corrupt(f"{len(vocab)} tokens and {len(merges)} merges; expected {GPT2_VOCAB_SIZE} and 50000")
    if by_id.get(GPT2_EOT_ID) != GPT2_EOT:
        raise corrupt(f"id {GPT2_EOT_ID} is {by_id.get(GPT2_EOT_ID)!r}, expected {GPT2_EOT}")
    wrong = [(256 + k, "".join(m)) for k, m in enumerate(merges) if by_id.get(256 + k) != "".join(m)]
    if len(wrong) > _MAX_REPAIRS or any(made in vocab for _, made in wrong):
        raise corrupt(f"{len(wrong)} ids disagree with the merges that make them")
    repairs = []
    for i, made in wrong:
        old = by_id.get(i)
        if old is not None:
            del vocab[old]
        vocab[made] = i
        repairs.append(f"id {i}: {old!r} restored to {made!r} (from merge {i - 256})")
    return repairs


def _is_cjk(ch: str) -> bool:
    """Whether `ch` is in the CJK blocks BERT puts spaces around (BertNormalizer's handle_chinese_chars)."""
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _wordlike(ch: str) -> bool:
    return ch.isalnum() and not _is_cjk(ch)


class BertChineseTokenizer(_HfTokenizer):
    """WordPiece over bert-base-chinese's vocab.txt, with a natural-text decode (see the module docstring)."""

    kind = "bert-chinese"

    def __init__(self, tok) -> None:
        super().__init__(tok)
        self._pieces = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
        self.unk_id = tok.token_to_id("[UNK]")

    @classmethod
    def from_vocab(cls, path: str | Path) -> BertChineseTokenizer:
        """From a BERT vocab.txt (one token a line, the line number is the id)."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

        path = Path(path)
        try:
            pieces = path.read_bytes().decode("utf-8").split("\n")
        except UnicodeDecodeError as e:
            raise DataCorruptError(f"{path}: not UTF-8 text ({e})", path=path) from e
        if pieces and pieces[-1] == "":
            pieces.pop()
        pieces = [p.rstrip("\r") for p in pieces]
        vocab: dict[str, int] = {}
        for i, p in enumerate(pieces):
            vocab.setdefault(p, i)
        wrong = {s: vocab.get(s) for s, i in BERT_SPECIALS.items() if vocab.get(s) != i}
        if wrong:
            raise DataCorruptError(
                f"{path}: not a BERT vocabulary (special tokens at {wrong}, expected {BERT_SPECIALS})",
                path=path,
            )
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        # bert-base-chinese's tokenizer_config: do_lower_case, tokenize_chinese_chars, strip_accents unset.
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        return cls(tok)

    @classmethod
    def load(cls, root: str | Path | None = None) -> BertChineseTokenizer:
        """From `tokenizers/bert-base-chinese/vocab.txt` under the data root; DataMissingError when absent."""
        return cls.from_vocab(_tokenizer_file(BERT_CHINESE_FILE, root, "bert-chinese", BERT_CHINESE_SOURCE))

    @property
    def name(self) -> str:
        return "bert-base-chinese" if self.vocab_size == BERT_CHINESE_VOCAB_SIZE else "bert-wordpiece"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        prev = ""  # the last character written ("" at the start)
        for i in self._check_ids(ids):
            piece = self._pieces[i]
            if i == self.unk_id:
                piece = UNK_TEXT
            elif piece in BERT_SPECIALS:
                continue  # [PAD] [CLS] [SEP] [MASK]: not text
            elif piece.startswith("##") and len(piece) > 2:
                piece = piece[2:]
                prev = ""  # a continuation joins its word: never a space before it
            if prev and _wordlike(prev) and _wordlike(piece[0]):
                out.append(" ")
            out.append(piece)
            prev = piece[-1]
        return "".join(out)

    def _payload(self) -> dict[str, Any]:
        return {**super()._payload(), "unk_text": UNK_TEXT}


def _normalise_for_check(text: str) -> str:
    """What BertChineseTokenizer keeps of `text` at best: no whitespace, no control characters, lower case
    without accents (tests and measurements compare decode(encode(text)) with this)."""
    text = "".join(c for c in text if not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf"))
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(c for c in text if unicodedata.category(c) != "Mn")


class BpeTokenizer(_HfTokenizer):
    """A byte-level BPE trained on the training text (see the module docstring)."""

    kind = "bpe"

    @classmethod
    def train(
        cls, text: str, vocab_size: int = 4096, min_frequency: int = 2, cache: str | Path | None = None
    ) -> BpeTokenizer:
        """`train_bpe([text], vocab_size, min_frequency)`, cached in `cache` (default cache_dir()/lm-bpe)."""
        from tokenizers import pre_tokenizers

        if not text:
            raise ValueError("cannot train a BPE on empty text")
        folder = Path(cache) if cache is not None else cache_dir() / "lm-bpe"
        tok = train_bpe([text], vocab_size, min_frequency=min_frequency, cache=folder)
        # Encode without the prefix space train_bpe's pre-tokenizer adds, so that decoding is exact.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        return cls(tok)

    @property
    def name(self) -> str:
        return f"bpe-{self.vocab_size}"

    def encode(self, text: str) -> list[int]:
        return _subword_encode(self.tok, [text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(self._check_ids(ids), skip_special_tokens=True)


class PretrainedTokenizer(_HfTokenizer):
    """The tokenizer of a pretrained Hugging Face model directory, used as it is (see the module docstring).

    `label` says where it came from (saved with it), e.g. "gpt2-tokenizer.json"."""

    kind = "pretrained"

    def __init__(self, tok, label: str = "pretrained") -> None:
        super().__init__(tok)
        self.label = label

    @classmethod
    def from_file(cls, path: str | Path) -> PretrainedTokenizer:
        """From an HF `tokenizer.json`; DataCorruptError when `tokenizers` cannot read it."""
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception
            raise DataCorruptError(
                f"{path}: not a usable tokenizer.json ({type(e).__name__}: {e})", path=path
            ) from e
        return cls(tok, f"{path.parent.name}/{path.name}")

    @classmethod
    def from_bpe_files(cls, vocab: str | Path, merges: str | Path) -> PretrainedTokenizer:
        """GPT-2's slow-tokenizer files (vocab.json + merges.txt) as a byte-level BPE, as GPT2TokenizerFast
        converts them: no prefix space, the ByteLevel decoder, `<|endoftext|>` special when present."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        vocab, merges = Path(vocab), Path(merges)
        try:
            tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as e:
            raise DataCorruptError(f"{vocab}, {merges}: not a byte-level BPE ({type(e).__name__}: {e})",
                                   path=vocab) from e  # fmt: skip
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(GPT2_EOT) is not None:
            tok.add_special_tokens([AddedToken(GPT2_EOT, special=True)])
        return cls(tok, f"{vocab.parent.name}/{vocab.name}+{merges.name}")

    @property
    def name(self) -> str:
        return f"pretrained-{self.vocab_size} ({self.label})"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(self._check_ids(ids), skip_special_tokens=False)

    def _payload(self) -> dict[str, Any]:
        return {**super()._payload(), "label": self.label}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> PretrainedTokenizer:
        return cls(_hf_from_obj(payload["tokenizer"]), payload.get("label", "pretrained"))


_CLASSES: dict[str, type[TextTokenizer]] = {
    "char": CharTokenizer,
    "gpt2": Gpt2Tokenizer,
    "bert-chinese": BertChineseTokenizer,
    "bpe": BpeTokenizer,
    "pretrained": PretrainedTokenizer,
}
assert tuple(_CLASSES)[: len(KINDS)] == KINDS
