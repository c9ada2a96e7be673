"""Text corpora for language models, their token streams (cached as memory maps), and random-window batches.

Corpora (`load_text(name)`), read under the data root (`root` > LLMLAB_DATA > ~/.cache/llmlab), every file
gzipped (`NAME.gz`) or plain and verified by the sha256 of its decompressed content:
- "tinyshakespeare": `tinyshakespeare/input.txt`, the 1115394-character Shakespeare excerpt of Karpathy's
  char-rnn ("The Unreasonable Effectiveness of Recurrent Neural Networks", 2015), the data of nanoGPT's
  shakespeare_char; `llmlab data download tinyshakespeare` fetches it from char-rnn's repository.
- "chinese_novels": the four classical novels in simplified Chinese, `chinese_novels/{hongloumeng,
  sanguo_yanyi,shuihu_zhuan,xiyouji}.txt`, joined with "\\n" in that (alphabetical) order; each novel alone
  by its file stem. The files come from github.com/tennessine/corpus (no single-file download exists), with
  CRLF line ends, which are turned into LF.
- "tang_poems", "song_ci": `chinese_poetry/{tang_poems,song_ci}.txt`, derived from
  github.com/chinese-poetry/chinese-poetry (one poem a line, `title<TAB>author<TAB>text`); the text field is
  kept, one poem a line. A few Tang titles hold a tab themselves, so the text is the LAST field.
- any path to a UTF-8 text file, or to a folder of `*.txt` / `*.txt.gz` files (sorted by name, hidden files
  skipped, joined with "\\n"); not verified (no checksum is known). A relative path is looked for in the
  working directory, then under the data root.
Every text has CRLF turned into LF and a leading byte-order mark removed; a file that is not UTF-8 is a
DataCorruptError naming it (and the line).

Tokens: `token_memmap(text, tokenizer)` tokenises once and keeps the ids as a raw uint16 file (uint32 when the
vocabulary does not fit), nanoGPT's train.bin format, in `cache_dir()/lm-tokens/<digest>.bin`, keyed by a
digest of the text and the tokenizer's saved JSON, with a small `<digest>.json` beside it (count, dtype);
later calls map the file instead of tokenising again. `split_tokens` cuts a contiguous validation tail.

Batches: `WindowLoader` draws random windows of `block_size + 1` tokens (x = the first block_size, y = the
same shifted by one), as nanoGPT's get_batch does, but from a generator seeded by (seed, epoch, batch index),
so any batch can be rebuilt and `iter_from` resumes bit-exactly; under data parallelism each process gets a
contiguous share of the global batch (as llmlab.data.loader.TensorLoader). With `shuffle=False` it walks
consecutive non-overlapping windows instead, so every token of the split is predicted once and the
validation loss is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmlab.data.lm_tokenizers import TextTokenizer
from llmlab.data.store import (
    DataCorruptError,
    DataMissingError,
    DatasetSpec,
    FileSpec,
    cache_dir,
    data_root_source,
    decode_utf8,
    find_file,
    locate_dataset,
    open_maybe_gzip,
    register_dataset,
    verify_file,
)
from llmlab.fileio import atomic_path, atomic_write_text

__all__ = [
    "CHINESE_NOVELS",
    "CHINESE_POETRY",
    "NOVELS",
    "POEMS",
    "TEXT_NAMES",
    "TINYSHAKESPEARE",
    "TextCorpus",
    "WindowLoader",
    "bytes_per_token",
    "load_text",
    "read_text_file",
    "split_tokens",
    "token_memmap",
]

NOVELS = ("hongloumeng", "sanguo_yanyi", "shuihu_zhuan", "xiyouji")  # the fixed order of "chinese_novels"
POEMS = ("tang_poems", "song_ci")
TEXT_NAMES = ("tinyshakespeare", "chinese_novels", *NOVELS, *POEMS)

NOVELS_REPO = "https://github.com/tennessine/corpus"
NOVELS_COMMIT = "c5ce96aca36c6a3cb4da5f0ff7d2d5fa30c32aea"
NOVELS_SOURCE_FILES = {  # file in the source repository -> our name
    "hongloumeng": "红楼梦.txt",
    "sanguo_yanyi": "三国演义.txt",
    "shuihu_zhuan": "水浒传.txt",
    "xiyouji": "西游记.txt",
}
POETRY_REPO = "https://github.com/chinese-poetry/chinese-poetry"
POETRY_COMMIT = "99ebbef7e1345c0985c44b9fd96a3f9e776f117b"
POETRY_SOURCE_FILES = {"tang_poems": "全唐诗/poet.tang.*.json", "song_ci": "宋词/ci.song.*.json"}


# ---------------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------------

TINYSHAKESPEARE = register_dataset(
    DatasetSpec(
        name="tinyshakespeare",
        description="Tiny Shakespeare (Karpathy's char-rnn), 1115394 characters, character-level LM",
        subdirs=("tinyshakespeare",),
        files=(
            FileSpec(
                "input.txt",
                sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                size=1115394,
                url_name="input.txt",  # served plain, not gzipped
            ),
        ),
        mirrors=("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/",),
        homepage="https://github.com/karpathy/char-rnn",
        citation="A. Karpathy, The Unreasonable Effectiveness of Recurrent Neural Networks, 2015",
        license="the plays are public domain; char-rnn is MIT-licensed",
    )
)

CHINESE_NOVELS = register_dataset(
    DatasetSpec(
        name="chinese_novels",
        description="the four classical Chinese novels (simplified, UTF-8), 3.02M characters",
        subdirs=("chinese_novels",),
        files=(
            FileSpec(
                "hongloumeng.txt", "5eca888fb54188d644df70fa555dd3c9cbdd3a8d7b3034fb59f7a81e16f05dc7", 2522985
            ),
            FileSpec(
                "sanguo_yanyi.txt",
                "48922aa73c07e0b9c6e23a9cf5cf61f1779dd33e11947a1eaac364f1c50f65c4",
                1795281,
            ),
            FileSpec(
                "shuihu_zhuan.txt",
                "aa966dd99d7ecac39f63eb187e5f29f4edb6061dc1adf73e4524eb7fd2345cdc",
                2580298,
            ),
            FileSpec(
                "xiyouji.txt", "3f2bf2164ee63ad7ce3ef88c830e88e860f47719740b13e6c4a1fe4d3be09b80", 1999157
            ),
        ),
        homepage=NOVELS_REPO,
        license="public-domain works; the source repository states no license",
    )
)

CHINESE_POETRY = register_dataset(
    DatasetSpec(
        name="chinese_poetry",
        description="Tang poems (57603) and Song ci (21050), one a line: title<TAB>author<TAB>text",
        subdirs=("chinese_poetry",),
        files=(
            FileSpec(
                "song_ci.txt", "689e20802cc83bf4d986bb5030d94a6681b24d553da6a0121421fadb41303ef6", 5575701
            ),
            FileSpec(
                "tang_poems.txt", "842d95abd6249177e3397cf8187fd38f55403218a2e1e5c2f0b3eb3591eec3d6", 12869367
            ),
        ),
        homepage=POETRY_REPO,
        license="MIT (chinese-poetry)",
    )
)


# ---------------------------------------------------------------------------------------------------------
# Reading text
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TextCorpus:
    """A text for language modelling and where it came from."""

    name: str  # a name of TEXT_NAMES, or the path given
    text: str
    source: str  # the file(s) or folder read
    notes: list[str] = field(default_factory=list)  # what was verified, converted, dropped

    def __len__(self) -> int:
        return len(self.text)


def _decode(data: bytes, where: str | Path) -> str:
    return decode_utf8(
        data,
        where,
        "Convert it to UTF-8 (e.g. `iconv -f GB18030 -t UTF-8`), or replace it with an official copy.",
    )


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file, gzipped (detected by magic bytes) or plain, with CRLF turned into LF."""
    path = Path(path)
    try:
        with open_maybe_gzip(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # a broken gzip stream is a damaged file
        raise DataCorruptError(f"{path}: cannot read it ({e})", path=path) from e
    return _decode(data, path).replace("\r\n", "\n")


def _missing(
    spec: DatasetSpec, missing: Sequence[FileSpec], root: Path, root_source: str
) -> DataMissingError:
    """Like DataMissingError.for_files, but for sets with no download: it names the source repository."""
    lines = [
        f"dataset {spec.name!r}: {len(missing)} of {len(spec.files)} files not found under the data root "
        f"{root} (from {root_source}).",
        "Expected files (gzipped NAME.gz or plain NAME), paths looked at:",
    ]
    for f in missing:
        lines.append(f"  {f.name}:")
        lines += [f"    {root / d / n}" for d in spec.subdirs for n in (f.name + ".gz", f.name)]
    if spec is CHINESE_NOVELS:
        files = ", ".join(f"{src} -> {stem}.txt" for stem, src in NOVELS_SOURCE_FILES.items())
        lines.append(
            f"There is no official single-file download. Source: the repository {NOVELS_REPO} (commit "
            f"{NOVELS_COMMIT[:8]}), files {files}: UTF-8 with CRLF line ends, used as they are (the sha256 "
            "of the content is checked)."
        )
    else:
        files = ", ".join(f"{src} -> {stem}.txt" for stem, src in POETRY_SOURCE_FILES.items())
        lines.append(
            f"There is no official single-file download. Source: the repository {POETRY_REPO} (commit "
            f"{POETRY_COMMIT[:8]}, MIT); the files are derived from its JSON ({files}): one poem a line, "
            "title<TAB>author<TAB>text, empty poems dropped (the data MANIFEST, section 7, describes them)."
        )
    lines.append(
        f"To fix: run `llmlab data status`, put the files in {root / spec.subdirs[0]}/ (gzipped or plain), "
        "or point LLMLAB_DATA (or --data-dir) at a folder that has them."
    )
    return DataMissingError("\n".join(lines), dataset=spec.name, missing=[f.name for f in missing], root=root)


def _locate(spec: DatasetSpec, names: Sequence[str], root, verify: bool) -> list[Path]:
    """The files `names` of a set with no download, in order; a missing-data error names all that lack."""
    root_path, root_source = data_root_source(root)
    wanted = [next(f for f in spec.files if f.name == n) for n in names]
    found = [find_file(spec, f, root_path) for f in wanted]
    missing = [f for f, p in zip(wanted, found, strict=True) if p is None]
    if missing:
        raise _missing(spec, missing, root_path, root_source)
    paths = [p for p in found if p is not None]
    if verify:
        for p, f in zip(paths, wanted, strict=True):
            verify_file(p, f, spec.name)
    return paths


def _verified_note(paths: Sequence[Path], verify: bool) -> str:
    names = ", ".join(p.name for p in paths)
    return f"sha256 of the content verified: {names}" if verify else f"not verified (verify=False): {names}"


def _poem_texts(path: Path, text: str) -> list[str]:
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataCorruptError(
                f"{path} line {n}: no tab; expected title<TAB>author<TAB>text ({line[:40]!r})", path=path
            )
        out.append(line.rsplit("\t", 1)[1].strip())
    return out


def _from_path(arg: str, path: Path) -> TextCorpus:
    if path.is_file():
        return TextCorpus(arg, read_text_file(path), str(path), ["any UTF-8 text: not verified"])
    files = sorted(
        (
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name.endswith((".txt", ".txt.gz"))
        ),
        key=lambda p: p.name,
    )
    if not files:
        raise DataMissingError(f"{path} holds no *.txt or *.txt.gz files to read", dataset=arg, root=path)
    stems = [p.name.removesuffix(".gz") for p in files]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise ValueError(f"{path} holds both NAME and NAME.gz for {', '.join(twice)}: keep one of each")
    text = "\n".join(read_text_file(p) for p in files)
    notes = [f"{len(files)} files joined with '\\n' in name order", "any UTF-8 text: not verified"]
    return TextCorpus(arg, text, str(path), notes)


def load_text(name: str | Path, root: str | Path | None = None, *, verify: bool = True) -> TextCorpus:
    """A corpus by name (TEXT_NAMES) or path, as the module docstring describes.

    `root`: the data root (> LLMLAB_DATA > ~/.cache/llmlab). `verify`: check the sha256 of named sets' files.
    Raises ValueError (unknown name that is no existing path), DataMissingError, DataCorruptError (checksum,
    not UTF-8, damaged gzip, a poem line without a tab).
    """
    key = str(name)
    if key == "tinyshakespeare":
        path = locate_dataset(TINYSHAKESPEARE, root, verify)["input.txt"]
        return TextCorpus(key, read_text_file(path), str(path), [_verified_note([path], verify)])
    if key == "chinese_novels" or key in NOVELS:
        stems = NOVELS if key == "chinese_novels" else (key,)
        paths = _locate(CHINESE_NOVELS, [f"{s}.txt" for s in stems], root, verify)
        text = "\n".join(read_text_file(p) for p in paths)
        notes = [_verified_note(paths, verify), "CRLF line ends turned into LF"]
        if len(paths) > 1:
            notes.append(f"{len(paths)} novels joined with '\\n': {', '.join(stems)}")
        return TextCorpus(key, text, ", ".join(str(p) for p in paths), notes)
    if key in POEMS:
        (path,) = _locate(CHINESE_POETRY, [f"{key}.txt"], root, verify)
        poems = _poem_texts(path, read_text_file(path))
        notes = [_verified_note([path], verify), f"{len(poems)} poems: the text field kept, one poem a line"]
        return TextCorpus(key, "\n".join(poems), str(path), notes)
    path = Path(key).expanduser()
    if not path.exists() and not path.is_absolute():
        under_root = data_root_source(root)[0] / path
        path = under_root if under_root.exists() else path
    if path.exists():
        return _from_path(key, path)
    raise ValueError(
        f"unknown text {key!r}: neither a known name ({', '.join(TEXT_NAMES)}) nor an existing file or folder"
    )


SCRIPT_CONVERSIONS = {"t2s": "traditional to simplified", "s2t": "simplified to traditional"}


def convert_script(text: str, conversion: str) -> tuple[str, str]:
    """(text, note): Chinese `text` converted between traditional and simplified characters with OpenCC's
    dictionaries (BYVoid, github.com/BYVoid/OpenCC: phrase-level, so one-to-many characters such as 乾/干
    follow their word), "t2s" or "s2t"; "none" returns it unchanged. The Tang poems are in traditional
    characters and the novels in simplified: a model of one adapts to the other without a vocabulary it lacks
    (27% of the poems' characters are outside the novels' character set before t2s, 1.3% after)."""
    if conversion == "none":
        return text, ""
    if conversion not in SCRIPT_CONVERSIONS:
        raise ValueError(f"conversion {conversion!r}: one of none, {', '.join(SCRIPT_CONVERSIONS)}")
    try:
        import opencc
    except ImportError as err:
        raise ImportError(
            f"converting Chinese {SCRIPT_CONVERSIONS[conversion]} needs OpenCC: pip install opencc"
        ) from err
    converted = opencc.OpenCC(conversion).convert(text)
    changed = sum(a != b for a, b in zip(text, converted, strict=False))
    length = "" if len(converted) == len(text) else f"; {len(text):,} -> {len(converted):,} characters"
    note = (
        f"Converted {SCRIPT_CONVERSIONS[conversion]} with OpenCC {conversion}: {changed:,} of {len(text):,} "
        f"characters changed ({changed / max(len(text), 1):.1%}{length})."
    )
    return converted, note


# ---------------------------------------------------------------------------------------------------------
# Token streams
# ---------------------------------------------------------------------------------------------------------


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def token_memmap(text: str, tokenizer: TextTokenizer, cache: str | Path | None = None) -> np.memmap:
    """The token ids of `text`, read-only, from a cache file in `cache` (default `cache_dir()/lm-tokens`).

    The first call tokenises and writes `<digest>.bin` (raw uint16, or uint32 when vocab_size > 65535) and
    `<digest>.json` (count, dtype, tokenizer name), both atomically; the digest covers the text and the
    tokenizer's saved JSON, so any change to either makes a new file. A cache file whose size does not match
    its record (truncated, or a record missing) is tokenised again and replaced.
    """
    if not text:
        raise ValueError("cannot tokenise an empty text")
    folder = Path(cache) if cache is not None else cache_dir() / "lm-tokens"
    h = hashlib.sha256(b"lm-tokens-v1\0")
    h.update(tokenizer.to_json().encode("utf-8") + b"\0")
    h.update(text.encode("utf-8", errors="surrogatepass"))
    digest = h.hexdigest()[:32]
    dtype = _token_dtype(tokenizer.vocab_size)
    binf, meta = folder / f"{digest}.bin", folder / f"{digest}.json"
    n = _cached_count(binf, meta, dtype)
    if n is None:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        if ids.size == 0:
            raise ValueError(f"{tokenizer.name} gives no tokens for this text")
        if ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
            raise ValueError(f"{tokenizer.name} gave ids outside range(0, {tokenizer.vocab_size})")
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(binf) as tmp:
            ids.astype(dtype).tofile(tmp)
        record = {
            "n_tokens": int(ids.size),
            "dtype": dtype.name,
            "tokenizer": tokenizer.name,
            "chars": len(text),
        }
        atomic_write_text(meta, json.dumps(record, indent=1))
        n = int(ids.size)
    return np.memmap(binf, dtype=dtype, mode="r", shape=(n,))


def _cached_count(binf: Path, meta: Path, dtype: np.dtype) -> int | None:
    """The token count of a complete cache entry, or None (absent, damaged, truncated)."""
    try:
        record = json.loads(meta.read_text())
        n = int(record["n_tokens"])
        if record["dtype"] != dtype.name or n <= 0 or binf.stat().st_size != n * dtype.itemsize:
            return None
        return n
    except (OSError, ValueError, KeyError, TypeError):
        return None


def split_tokens(tokens, val_fraction: float):
    """(train, val): the first part and the last `val_fraction` of `tokens`, contiguous (slices, so views of
    an array or memmap; a str works too, e.g. to split text before building a char vocabulary). The cut is
    nanoGPT's: train = tokens[: int(n * (1 - val_fraction))]."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cut = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:cut], tokens[cut:]


def bytes_per_token(text: str, n_tokens: int) -> float:
    """UTF-8 bytes of `text` per token: the compression a tokenizer gives (and what turns a loss per token
    into bits per byte, comparable across tokenizers)."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    return len(text.encode("utf-8")) / n_tokens


# ---------------------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------------------

Batch = tuple[torch.Tensor, torch.Tensor]


class WindowLoader:
    """The loader protocol of llmlab.data.loader (len, set_epoch, iter_from) over a 1-D token array.

    Yields (x [B, T], y [B, T]) int64 on `device`, y the same window shifted by one token (y[:, t] is the
    token that follows x[:, t]); B is this process's share of the GLOBAL `batch_size`, T = `block_size`.
    `tokens`: a numpy array or memmap (read in place: only the windows are copied) or a torch tensor (indexed
    where it lives, e.g. already on the GPU).
    - `shuffle=True` (training): each batch takes `batch_size` window starts uniformly from
      [0, n - block_size - 1] (windows may overlap, as in nanoGPT), from a generator seeded by a hash of
      (seed, epoch, batch index); `steps_per_epoch` batches an epoch (default n // (batch_size * block_size):
      about one pass over the tokens). `batch_size` must divide by `world_size`.
    - `shuffle=False` (evaluation): the windows start at 0, T, 2T, ... and do not overlap, so each of the
      tokens 1 .. m*T (m = (n - 1) // T windows) is predicted exactly once; the few tokens after the last
      full window are dropped (a partial window would weigh its positions differently). Consecutive windows
      form the batches, the last one possibly smaller (shares of it may then differ in size);
      `steps_per_epoch`, when given, keeps only the first batches. The same every epoch.
    """

    def __init__(
        self,
        tokens,
        block_size: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        steps_per_epoch: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device | None = None,
    ) -> None:
        if isinstance(tokens, torch.Tensor):
            self.tokens = tokens
        else:
            self.tokens = np.asarray(tokens)  # a memmap stays a view of the file
        if self.tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(self.tokens.shape)}")
        n = int(self.tokens.shape[0])
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size and batch_size must be >= 1, got {block_size}, {batch_size}")
        if n < block_size + 1:
            raise ValueError(
                f"{n} tokens are too few for one window: block_size={block_size} needs {block_size + 1}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in range(world_size={world_size})")
        if shuffle and batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is not divisible by world_size={world_size}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.block_size, self.batch_size, self.shuffle = block_size, batch_size, shuffle
        self.steps_per_epoch, self.seed = steps_per_epoch, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_windows(self) -> int:
        """Evaluation windows: the non-overlapping full windows of the split."""
        return (self.num_tokens - 1) // self.block_size

    def __len__(self) -> int:
        """Global batches per epoch."""
        if self.shuffle:
            return self.steps_per_epoch or max(1, self.num_tokens // (self.batch_size * self.block_size))
        full = math.ceil(self.num_windows / self.batch_size)
        return min(full, self.steps_per_epoch) if self.steps_per_epoch else full

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, b: int) -> torch.Generator:
        key = hashlib.blake2b(f"{self.seed},{self.epoch},{b}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(key, "little") & (2**63 - 1))

    def starts(self, b: int) -> torch.Tensor:
        """The window starts of global batch `b` of the current epoch (int64, CPU), all processes' rows."""
        if self.shuffle:
            high = self.num_tokens - self.block_size  # starts 0 .. n-T-1: the target needs one more token
            return torch.randint(0, high, (self.batch_size,), generator=self._generator(b))
        first = b * self.batch_size
        last = min(first + self.batch_size, self.num_windows)
        return torch.arange(first, last, dtype=torch.int64) * self.block_size

    def _gather(self, starts: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.block_size + 1)
        if isinstance(self.tokens, torch.Tensor):
            idx = (starts[:, None] + offsets).to(self.tokens.device)
            windows = self.tokens[idx].long()  # [B, T+1]
        else:
            idx = (starts[:, None] + offsets).numpy()
            windows = torch.from_numpy(self.tokens[idx].astype(np.int64))  # [B, T+1]
        return windows

    def iter_from(self, start: int) -> Iterator[Batch]:
        """Batches `start, start+1, ...` of the current epoch (this process's share of each)."""
        for b in range(start, len(self)):
            share = torch.tensor_split(self.starts(b), self.world_size)[self.rank]
            windows = self._gather(share)
            x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # [B, T] each
            if self.device is not None:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield x, y

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)
