"""Word-level text pipeline: cleaning, a regex tokenizer, a frequency-ranked vocabulary, padded id tensors.

The vocabulary is built on the training split only (validation and test words it has not seen map to
`<unk>`), the classic setup of word-level sentiment models (Maas et al. 2011 use a 5000/89527-word vocab over
IMDB's training reviews).

Tokenizer (`TOKEN_PATTERN`, documented choice): after `clean_text` (`<br />` line breaks -> space, lowercase),
a token is either a run of Unicode letters/digits with inner apostrophes (`don't`, `it's`, `rock'n'roll`,
`café`, `1950s`; a curly apostrophe ’ counts as ') or a single `!` or `?`, which carry sentiment ("great!",
"really?"). Everything else (other punctuation, HTML remnants, underscores, and leading or trailing
apostrophes, as in 'quoted' or students') separates tokens and is dropped; hyphenated words split
(`well-made` -> `well`, `made`), and so do numbers like `7/10` -> `7`, `10`.

Truncation for long reviews (`truncate`): "head" keeps the first `max_len` tokens, "tail" the last, and
"head+tail" the first quarter and the last three quarters of the budget: the proportions of the head+tail
truncation that Sun et al. found best on IMDb (C. Sun, X. Qiu, Y. Xu, X. Huang, "How to Fine-Tune BERT for
Text Classification?", CCL 2019: 128 head + 382 tail of 510 tokens, ahead of head-only and tail-only).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain, repeat
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmlab.data.store import cache_dir
from llmlab.fileio import atomic_write_bytes

if TYPE_CHECKING:
    import torch

TOKEN_PATTERN = r"[^\W_]+(?:'[^\W_]+)*|[!?]"
TRUNCATIONS = ("head", "tail", "head+tail")
SPECIALS = ("<pad>", "<unk>")  # pad = 0, unk = 1
_TOKEN_RE = re.compile(TOKEN_PATTERN)
_BR_RE = re.compile(r"<br\s*/?>", re.IGNORECASE)
_WS_RE = re.compile(r"\s+")
_VOCAB_FORMAT = "llmlab-vocab-v1"
# Part of the encode cache key: bump it when clean_text/tokenize change what they produce.
_TOKENIZER_VERSION = "llmlab-words-v1:" + TOKEN_PATTERN
_CACHE_FORMAT = "llmlab-encoded-v1"


# ---------------------------------------------------------------------------------------------------------
# Cleaning and tokenising
# ---------------------------------------------------------------------------------------------------------


def clean_text(s: str) -> str:
    """`<br />`, `<br/>`, `<br>` (any case) -> a space; lowercase; runs of whitespace -> one space; strip."""
    return _WS_RE.sub(" ", _BR_RE.sub(" ", s).lower()).strip()


def tokenize(s: str) -> list[str]:
    """Words and `!`/`?` of `clean_text(s)`, by `TOKEN_PATTERN` (see the module docstring).

    The whitespace normalisation of `clean_text` is skipped here: it cannot change the tokens, and it is a
    third of the cost over a corpus.
    """
    s = s.lower()
    if "<br" in s:
        s = _BR_RE.sub(" ", s)
    if "\u2019" in s:
        s = s.replace("\u2019", "'")  # curly apostrophe (it’s) as the straight one
    return _TOKEN_RE.findall(s)


def truncate(tokens: Sequence, max_len: int | None, truncation: str = "head") -> Sequence:
    """At most `max_len` items of `tokens`: the head, the tail, or the head quarter + tail three quarters."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
    if max_len is not None and max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if max_len is None or len(tokens) <= max_len:
        return tokens
    if truncation == "head":
        return tokens[:max_len]
    if truncation == "tail":
        return tokens[len(tokens) - max_len :]
    head = max_len // 4
    return list(tokens[:head]) + list(tokens[len(tokens) - (max_len - head) :])


# ---------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------


class Vocab:
    """Token <-> id. Ids: the specials first (`<pad>` = 0, `<unk>` = 1, then any others), then the training
    tokens by descending frequency, ties broken alphabetically (by code point), so the same corpus always
    gives the same ids.

    `counts[i]` is the training frequency of token i (0 for specials); `n_train_tokens`/`n_train_types` are
    the totals over the corpus it was built from, so `stats()` can say how much of it the vocab covers.
    """

    pad_id = 0
    unk_id = 1

    def __init__(
        self,
        itos: Sequence[str],
        counts: Sequence[int] | None = None,
        *,
        specials: Sequence[str] = SPECIALS,
        min_freq: int = 1,
        max_size: int | None = None,
        n_train_tokens: int = 0,
        n_train_types: int = 0,
    ) -> None:
        specials = tuple(specials)
        if len(specials) < 2 or tuple(itos[: len(specials)]) != specials:
            raise ValueError(f"a vocab starts with its specials (pad, unk, ...), got {list(itos[:3])}")
        self.itos = list(itos)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate tokens in the vocab")
        self.counts = list(counts) if counts is not None else [0] * len(self.itos)
        if len(self.counts) != len(self.itos):
            raise ValueError(f"{len(self.counts)} counts for {len(self.itos)} tokens")
        self.specials = specials
        self.min_freq = min_freq
        self.max_size = max_size
        self.n_train_tokens = n_train_tokens
        self.n_train_types = n_train_types

    @property
    def pad(self) -> str:
        return self.specials[0]

    @property
    def unk(self) -> str:
        return self.specials[1]

    @classmethod
    def build(
        cls,
        token_lists: Iterable[Sequence[str]],
        min_freq: int = 1,
        max_size: int | None = None,
        specials: Sequence[str] = SPECIALS,
    ) -> Vocab:
        """The vocab of `token_lists` (the training split): tokens seen at least `min_freq` times, the most
        frequent first, at most `max_size` entries in all (specials included: it is the embedding's size)."""
        specials = tuple(specials)
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        if max_size is not None and max_size < len(specials):
            raise ValueError(f"max_size={max_size} leaves no room for the {len(specials)} specials")
        counter = Counter(chain.from_iterable(token_lists))
        for s in specials:  # a special is never a corpus token
            counter.pop(s, None)
        n_tokens = sum(counter.values())
        kept = sorted(((t, c) for t, c in counter.items() if c >= min_freq), key=lambda tc: (-tc[1], tc[0]))
        if max_size is not None:
            kept = kept[: max_size - len(specials)]
        return cls(
            [*specials, *(t for t, _ in kept)],
            [0] * len(specials) + [c for _, c in kept],
            specials=specials,
            min_freq=min_freq,
            max_size=max_size,
            n_train_tokens=n_tokens,
            n_train_types=len(counter),
        )

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: object) -> bool:
        return token in self.stoi

    def __getitem__(self, token: str) -> int:
        """The id of `token`, `unk_id` when it is not in the vocab."""
        return self.stoi.get(token, self.unk_id)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self.itos == other.itos and self.counts == other.counts and self.specials == other.specials

    __hash__ = None  # mutable: not hashable

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, min_freq={self.min_freq}, max_size={self.max_size})"

    def encode(
        self, tokens: Sequence[str], max_len: int | None = None, truncation: str = "head"
    ) -> list[int]:
        """Ids of `tokens` (unknown ones -> `unk_id`), truncated to `max_len` (see `truncate`); no padding."""
        return list(map(self.stoi.get, truncate(tokens, max_len, truncation), repeat(self.unk_id)))

    def decode(self, ids: Iterable[int], skip_pad: bool = True) -> list[str]:
        """Tokens of `ids` (padding dropped unless `skip_pad=False`)."""
        return [self.itos[int(i)] for i in ids if not (skip_pad and int(i) == self.pad_id)]

    def fingerprint(self) -> str:
        """sha256 of the token list (ids depend only on it): a cache key for encoded corpora."""
        return hashlib.sha256(json.dumps(self.itos, ensure_ascii=False).encode()).hexdigest()

    # -- statistics ---------------------------------------------------------------------------------------

    def coverage(self, token_lists: Iterable[Sequence[str]]) -> float:
        """Fraction of the tokens of `token_lists` that are in the vocab (1 - the `<unk>` rate)."""
        total = known = 0
        stoi = self.stoi
        for tokens in token_lists:
            total += len(tokens)
            known += sum(1 for t in tokens if t in stoi)
        return known / total if total else 1.0

    def stats(self) -> dict[str, float | int | None]:
        """Size and the training corpus it covers: `train_coverage` = kept token occurrences / all of them."""
        kept = sum(self.counts)
        n = self.n_train_tokens
        return {
            "size": len(self),
            "specials": len(self.specials),
            "min_freq": self.min_freq,
            "max_size": self.max_size,
            "train_tokens": n,
            "train_types": self.n_train_types,
            "train_types_kept": len(self) - len(self.specials),
            "train_coverage": kept / n if n else 1.0,
            "train_unk_rate": 1 - kept / n if n else 0.0,
        }

    # -- persistence ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": _VOCAB_FORMAT,
            "specials": list(self.specials),
            "min_freq": self.min_freq,
            "max_size": self.max_size,
            "n_train_tokens": self.n_train_tokens,
            "n_train_types": self.n_train_types,
            "tokenizer": _TOKENIZER_VERSION,
            "itos": self.itos,
            "counts": self.counts,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        if d.get("format") != _VOCAB_FORMAT:
            raise ValueError(f"not an llmlab vocab (format {d.get('format')!r}, expected {_VOCAB_FORMAT!r})")
        return cls(
            d["itos"],
            d["counts"],
            specials=d["specials"],
            min_freq=d["min_freq"],
            max_size=d["max_size"],
            n_train_tokens=d["n_train_tokens"],
            n_train_types=d["n_train_types"],
        )

    def to_json(self, path: str | Path) -> Path:
        """Write atomically (temp file in the same folder, fsync, rename): a run saves its vocab with it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(self.to_dict(), ensure_ascii=False).encode("utf-8"))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> Vocab:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: not a readable vocab file ({e})") from e
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a valid vocab file ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------------------
# Encoding a corpus
# ---------------------------------------------------------------------------------------------------------


def encode_corpus(
    texts: Sequence[str] | Sequence[Sequence[str]],
    vocab: Vocab,
    max_len: int,
    truncation: str = "head",
    *,
    cache: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens int64 [N, max_len], lengths int64 [N]) of N texts (or pre-tokenised token lists).

    Each text is tokenised (`tokenize`), truncated to `max_len` (`truncate`), mapped to ids (unknown ->
    `<unk>`) and right-padded with `<pad>` = 0; `lengths[i]` counts its real tokens (0 for an empty text:
    filter those out before `pack_padded_sequence`, which refuses length 0). With `cache`, the result is kept
    in `cache_dir()/text/` keyed by the vocab, `max_len`, `truncation`, the tokenizer and the sha256 of the
    texts themselves, so a changed corpus or vocab is never served stale (the files may be deleted any time).
    """
    import torch

    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
    path = key = None
    if cache:
        key = _cache_key(texts, vocab, max_len, truncation)
        path = cache_dir() / "text" / f"encoded-{key[:24]}.npz"
        hit = _read_cache(path, key, len(texts), max_len)
        if hit is not None:
            return torch.from_numpy(hit[0]), torch.from_numpy(hit[1])
    lengths = np.empty(len(texts), dtype=np.int64)
    flat: list[int] = []
    extend, get, unk = flat.extend, vocab.stoi.get, vocab.unk_id
    for i, text in enumerate(texts):
        tokens = truncate(tokenize(text) if isinstance(text, str) else text, max_len, truncation)
        lengths[i] = len(tokens)
        extend(map(get, tokens, repeat(unk)))
    ids = _pad(np.array(flat, dtype=np.int64), lengths, max_len)
    if path is not None and key is not None:
        _write_cache(path, key, ids, lengths)
    return torch.from_numpy(ids), torch.from_numpy(lengths)


def _pad(flat: np.ndarray, lengths: np.ndarray, max_len: int) -> np.ndarray:
    """[N, max_len] int64, row i = the next lengths[i] ids of `flat`, then zeros (`<pad>`)."""
    out = np.zeros((len(lengths), max_len), dtype=np.int64)
    # A boolean mask is filled in row-major order: exactly the order of the concatenated rows in `flat`.
    out[np.arange(max_len)[None, :] < lengths[:, None]] = flat
    return out


def _cache_key(texts: Sequence, vocab: Vocab, max_len: int, truncation: str) -> str:
    h = hashlib.sha256(
        json.dumps([_CACHE_FORMAT, _TOKENIZER_VERSION, vocab.fingerprint(), max_len, truncation]).encode()
    )
    for text in texts:
        if isinstance(text, str):
            h.update(b"s" + text.encode("utf-8", "surrogatepass") + b"\0")
        else:  # pre-tokenised: the tokens, each ended by a separator no token contains
            h.update(b"t" + "\x1f".join(text).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _read_cache(path: Path, key: str, n: int, max_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                raise ValueError("written for another corpus or vocab")
            flat, lengths = z["flat"].astype(np.int64), z["lengths"].astype(np.int64)
        if lengths.shape != (n,) or int(lengths.sum()) != len(flat) or (n and int(lengths.max()) > max_len):
            raise ValueError("shapes do not match")
        return _pad(flat, lengths, max_len), lengths
    except Exception as e:  # whatever is wrong with a cache file, the cure is to encode again
        warnings.warn(f"ignoring a damaged encoded-text cache {path} ({e}); encoding again", stacklevel=3)
        path.unlink(missing_ok=True)
        return None


def _write_cache(path: Path, key: str, ids: np.ndarray, lengths: np.ndarray) -> None:
    """Only the real tokens are stored (int32, unpadded): a fraction of the padded tensor's size."""
    import io

    flat = ids[np.arange(ids.shape[1])[None, :] < lengths[:, None]]
    dtype = np.int32 if ids.size == 0 or int(ids.max()) < 2**31 else np.int64
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), flat=flat.astype(dtype), lengths=lengths.astype(np.int32))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:  # the cache is an optimisation: a read-only cache dir only costs time
        warnings.warn(f"could not write the encoded-text cache {path}: {e}", stacklevel=3)
