"""Parallel corpora: Multi30k (raw files gz/plain/mixed, the WMT16 archives) and IWSLT 2017 (folder, .tgz,
.zip, Hugging Face through a stand-in module) built small in tmp_path; alignment, encoding, checksum and
missing-data errors; status and download (over loopback); and the shared Multi30k copy (LLMLAB_DATA)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest

from llmlab.data import DATASETS, load_parallel
from llmlab.data.store import (
    DataCorruptError,
    DataDownloadError,
    DataMissingError,
    FileSpec,
    dataset_status,
    download_dataset,
    format_status,
)
from llmlab.data.translation import (
    HF_URL,
    IWSLT2017,
    IWSLT_ALL_TESTS,
    LAYOUTS,
    MULTI30K,
    MULTI30K_MIRROR,
    WIT3_URL,
    load_iwslt2017,
    load_multi30k,
    parse_segments,
    split_lines,
)
from tests.conftest import _require_data
from tests.data.test_store import serve

# ---------------------------------------------------------------------------------------------------------
# Multi30k fixtures: (en, de) lines per file stem; an empty line and stray whitespace in train
# ---------------------------------------------------------------------------------------------------------

M30K = {
    "train": (
        ["Two young, White males are outside.", "", "  A dog runs\t", "Ein Café?"],
        ["Zwei junge weiße Männer sind im Freien.", "", "Ein Hund rennt", "A café?"],
    ),
    "val": (["A group of men.", "A woman plays."], ["Eine Gruppe von Männern.", "Eine Frau spielt."]),
    "test_2016_flickr": (["A man sleeps."], ["Ein Mann schläft."]),
    "test_2017_flickr": (["A cat.", "A hat."], ["Eine Katze.", "Ein Hut."]),
}
STEMS = ("train", "val", "test_2016_flickr")


def _text(lines: list[str], eol: str = "\n") -> bytes:
    return "".join(line + eol for line in lines).encode("utf-8")


def write_raw(folder: Path, mode: str = "gz", stems=STEMS, eol: str = "\n") -> Path:
    """The raw files; mode "gz", "plain" or "mixed" (en gzipped, de plain)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        for lang, lines in zip(("en", "de"), M30K[stem], strict=True):
            data = _text(lines, eol)
            if mode == "gz" or (mode == "mixed" and lang == "en"):
                (folder / f"{stem}.{lang}.gz").write_bytes(gzip.compress(data, mtime=0))
            else:
                (folder / f"{stem}.{lang}").write_bytes(data)
    return folder


def _stripped(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines]


def _expected(stem: str, src_lang: str = "en") -> tuple[list[str], list[str]]:
    en, de = (_stripped(x) for x in M30K[stem])
    return (en, de) if src_lang == "en" else (de, en)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_archives(folder: Path) -> Path:
    """The WMT16 archives as torchtext uses them: train/val files end with a blank line; the test archive is
    the repacked mirror's shape (./ prefix, macOS ._ entries)."""
    en, de = M30K["train"]
    _tar(folder / "training.tar.gz", {"train.en": _text(en) + b"\n", "train.de": _text(de) + b"\n"})
    en, de = M30K["val"]
    _tar(folder / "validation.tar.gz", {"val.de": _text(de) + b"\n", "val.en": _text(en) + b"\n"})
    en, de = M30K["test_2016_flickr"]
    _tar(
        folder / "mmt16_task1_test.tar.gz",
        {
            "./._test.en": b"\x00\x05junk",
            "./test.en": _text(en),
            "./._test.de": b"\xff",
            "./test.de": _text(de),
        },
    )
    return folder


def _content_sha(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).hexdigest()


def fake_spec(folder: Path, archives: bool = False):
    """MULTI30K with the digests of the fakes in `folder` (so verification passes on them)."""
    if archives:
        files = tuple(
            FileSpec(p.name, sha256=hashlib.sha256(p.read_bytes()).hexdigest(), raw=True)
            for p in sorted(folder.glob("*.tar.gz"))
        )
        return dataclasses.replace(MULTI30K, alternatives=files)
    files = tuple(
        FileSpec(p.name.removesuffix(".gz"), sha256=_content_sha(p)) for p in sorted(folder.iterdir())
    )
    main = tuple(f for f in files if f.name.split(".")[0] in STEMS)
    return dataclasses.replace(MULTI30K, files=main, alternatives=tuple(f for f in files if f not in main))


# ---------------------------------------------------------------------------------------------------------
# Multi30k
# ---------------------------------------------------------------------------------------------------------


def test_split_lines_strips_endings_and_keeps_empty_lines():
    assert split_lines("a\r\n\r\n b \nc") == ["a", "", "b", "c"]
    assert split_lines("a\n") == ["a"] and split_lines("") == []
    assert split_lines("x\u2028y\x85z\n") == ["x\u2028y\x85z"]  # only "\n" ends a line


@pytest.mark.parametrize(
    "mode, sub, eol",
    [
        ("gz", "multi30k/raw", "\n"),
        ("plain", "multi30k", "\r\n"),
        ("mixed", "multi30k/data/task1/raw", "\n"),
        ("plain", "", "\n"),
    ],
)
def test_raw_layouts(tmp_path, mode, sub, eol):
    folder = write_raw(tmp_path / sub if sub else tmp_path, mode, eol=eol)
    c = load_multi30k(tmp_path, verify=False)
    assert (c.name, c.src_lang, c.tgt_lang, c.layout, c.test_name) == (
        "multi30k",
        "en",
        "de",
        "raw",
        STEMS[2],
    )
    assert c.source == str(folder)
    for split, stem in zip(("train", "val", "test"), STEMS, strict=True):
        assert c.splits[split] == _expected(stem), split
    assert c.splits["train"][0][1] == "" and c.splits["train"][1][1] == ""  # an empty pair is kept
    assert c.pairs("val")[1] == ("A woman plays.", "Eine Frau spielt.")
    assert c.description() == (
        f"Multi30k en-de (Elliott et al. 2016) from the raw files in {folder}: 4 train / 2 val / "
        "1 test_2016_flickr"
    )
    assert any("not verified" in n for n in c.notes)


def test_both_directions_and_dispatch(tmp_path):
    write_raw(tmp_path / "multi30k" / "raw")
    de_en = load_multi30k(tmp_path, "de", "en", verify=False)
    assert (de_en.src_lang, de_en.tgt_lang) == ("de", "en")
    for split, stem in zip(("train", "val", "test"), STEMS, strict=True):
        assert de_en.splits[split] == _expected(stem, "de")
    assert de_en.description().startswith("Multi30k de-en")
    with pytest.raises(ValueError, match="unknown parallel corpus 'wmt14'; choose from multi30k, iwslt2017"):
        load_parallel("wmt14", tmp_path)


def test_search_order_first_folder_wins_per_file(tmp_path):
    write_raw(tmp_path, "plain")
    write_raw(tmp_path / "multi30k" / "raw")
    assert load_multi30k(tmp_path, verify=False).source == str(tmp_path / "multi30k" / "raw")


def test_other_test_sets(tmp_path):
    folder = write_raw(tmp_path / "multi30k" / "raw", stems=("train", "val", "test_2017_flickr"))
    c = load_multi30k(tmp_path, test_set="test_2017_flickr", verify=False)
    assert c.test_name == "test_2017_flickr" and c.splits["test"] == _expected("test_2017_flickr")
    assert c.description().endswith("2 test_2017_flickr")
    # the default test set is not there: missing, and the message says where to get it
    with pytest.raises(DataMissingError) as info:
        load_multi30k(tmp_path, verify=False)
    msg = str(info.value)
    assert "test_2016_flickr.en" in msg and f"{MULTI30K_MIRROR}test_2016_flickr.de.gz" in msg
    assert "train.en" not in msg.split("Missing raw files")[1]  # only what is missing is listed
    assert info.value.missing == ["test_2016_flickr.en", "test_2016_flickr.de"]
    with pytest.raises(ValueError) as bad:
        load_multi30k(tmp_path, test_set="test_2019", verify=False)
    assert "test_2016_flickr, test_2017_flickr, test_2017_mscoco, test_2018_flickr" in str(bad.value)
    assert f"present under {tmp_path}: test_2017_flickr" in str(bad.value)
    (folder / "test_2018_flickr.en.gz").write_bytes(gzip.compress(b"x\n"))
    with pytest.raises(DataMissingError, match=r"fetches train, val and test_2016_flickr; get the test_2018"):
        load_multi30k(tmp_path, test_set="test_2018_flickr", verify=False)


def test_wrong_language_pair(tmp_path):
    write_raw(tmp_path)
    for src, tgt in (("en", "fr"), ("en", "en"), ("fr", "de")):
        with pytest.raises(
            ValueError, match=f"unsupported language pair {src}-{tgt}; supported: en-de, de-en"
        ):
            load_multi30k(tmp_path, src, tgt, verify=False)
    with pytest.raises(ValueError, match="supported: en-de, de-en"):
        load_iwslt2017(tmp_path, "de", "fr")


def test_mismatched_line_counts_name_both_files(tmp_path):
    folder = write_raw(tmp_path, "plain")
    (folder / "val.de").write_bytes(_text(["Nur eine Zeile."]))
    with pytest.raises(DataCorruptError) as info:
        load_multi30k(tmp_path, verify=False)
    msg = str(info.value)
    assert f"{folder / 'val.en'} has 2 lines but {folder / 'val.de'} has 1" in msg and "val split" in msg


def test_non_utf8_names_the_file_and_line(tmp_path):
    folder = write_raw(tmp_path)
    (folder / "train.de.gz").write_bytes(gzip.compress(b"gut\nso \xe4 nicht\n"))
    with pytest.raises(DataCorruptError, match=r"train\.de\.gz: not UTF-8 text \(line 2, byte 7"):
        load_multi30k(tmp_path, verify=False)
    (folder / "train.de.gz").write_bytes(gzip.compress(b"gut\n")[:15])  # a truncated gzip stream
    with pytest.raises(DataCorruptError, match=r"train\.de\.gz: cannot read it"):
        load_multi30k(tmp_path, verify=False)


def test_missing_data_error_names_files_layouts_and_command(tmp_path):
    with pytest.raises(DataMissingError) as info:
        load_multi30k(tmp_path / "empty")
    msg = str(info.value)
    for part in (
        "train.en",
        "val.de",
        "test_2016_flickr.en",
        "training.tar.gz",
        "mmt16_task1_test.tar.gz",
        "github.com/multi30k/dataset",
        f"{MULTI30K_MIRROR}train.en.gz",
        "llmlab data download multi30k",
        str(tmp_path / "empty" / "multi30k" / "raw" / "train.en.gz"),
        str(tmp_path / "empty" / "multi30k" / "data" / "task1" / "raw" / "val.de"),
    ):
        assert part in msg, part
    assert info.value.dataset == "multi30k" and len(info.value.missing) == 6


def test_checksums_are_verified(tmp_path):
    folder = write_raw(tmp_path / "multi30k" / "raw", stems=(*STEMS, "test_2017_flickr"))
    with pytest.raises(DataCorruptError, match="sha256 of the decompressed content"):
        load_multi30k(tmp_path)  # the real digests do not match the fakes
    spec = fake_spec(folder)
    c = load_multi30k(tmp_path, spec=spec)
    assert c.notes == ["checksums verified (sha256 of the decompressed content)"]
    c = load_multi30k(tmp_path, test_set="test_2017_flickr", spec=spec)  # an alternative, verified too
    assert c.notes == ["checksums verified (sha256 of the decompressed content)"]
    (folder / "val.en.gz").write_bytes(gzip.compress(_text(["A group of men!", "A woman plays."])))
    with pytest.raises(DataCorruptError, match="val.en.gz"):
        load_multi30k(tmp_path, spec=spec)


def test_official_archives_layout(tmp_path):
    folder = write_archives(tmp_path / "multi30k")
    c = load_multi30k(tmp_path, verify=False)
    assert c.layout == "archives" and c.source == str(folder)
    for split, stem in zip(("train", "val", "test"), STEMS, strict=True):
        assert c.splits[split] == _expected(stem), split  # the archives' blank last line is dropped
    assert load_multi30k(tmp_path, "de", "en", verify=False).splits["val"] == _expected("val", "de")
    assert "WMT16 task-1 archives in" in c.description()
    # verified against the archives' own digests (the real ones do not match the fakes)
    with pytest.raises(DataCorruptError, match="sha256 of the file"):
        load_multi30k(tmp_path)
    c = load_multi30k(tmp_path, spec=fake_spec(folder, archives=True))
    assert any("archive checksums verified" in n for n in c.notes)
    # raw files, when complete, come first; the archives serve only test_2016_flickr
    write_raw(tmp_path / "multi30k" / "raw")
    assert load_multi30k(tmp_path, verify=False).layout == "raw"
    with pytest.raises(DataMissingError):
        load_multi30k(tmp_path / "multi30k", test_set="test_2017_flickr", verify=False)


def test_archive_without_the_members(tmp_path):
    folder = write_archives(tmp_path)
    _tar(folder / "validation.tar.gz", {"val.en": _text(["x"]), "README": b"hi"})
    with pytest.raises(DataCorruptError, match=r"validation\.tar\.gz: no member val\.de"):
        load_multi30k(tmp_path, verify=False)
    (folder / "training.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 not really")
    with pytest.raises(DataCorruptError, match=r"training\.tar\.gz: damaged archive"):
        load_multi30k(tmp_path, verify=False)


def test_status_reports_layout_and_checksums(tmp_path):
    st = dataset_status(MULTI30K, tmp_path / "none")
    assert st.state == "missing" and [f.name for f in st.files] == [f.name for f in MULTI30K.files]
    folder = write_raw(tmp_path / "r" / "multi30k" / "raw")
    st = dataset_status(MULTI30K, tmp_path / "r")
    assert st.state == "corrupt" and st.layout == LAYOUTS["raw"]  # the fakes are not the real files
    st = dataset_status(fake_spec(folder), tmp_path / "r")
    assert st.state == "present" and all(f.ok for f in st.files) and len(st.files) == 6
    assert "6/6 found, 6 checksum ok (raw files)" in format_status([st])
    (folder / "val.de.gz").unlink()
    st = dataset_status(MULTI30K, tmp_path / "r", verify=False)
    assert st.state == "partial"
    archives = write_archives(tmp_path / "a")
    st = dataset_status(fake_spec(archives, archives=True), tmp_path / "a")
    assert (
        st.state == "present" and st.layout == LAYOUTS["archives"] and [f.ok for f in st.files] == [True] * 3
    )
    (archives / "validation.tar.gz").unlink()
    st = dataset_status(MULTI30K, tmp_path / "a", verify=False)
    assert st.state == "partial" and "incomplete" in st.layout


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def test_download_fetches_the_gz_files_over_loopback(tmp_path, no_proxy):
    served = write_raw(tmp_path / "served")
    spec = fake_spec(served)
    root = tmp_path / "root"
    with serve(served) as url:
        assert download_dataset(spec, root, mirrors=[url], progress=False) == root / "multi30k" / "raw"
    assert sorted(p.name for p in (root / "multi30k" / "raw").iterdir()) == sorted(
        p.name for p in served.iterdir()
    )
    c = load_multi30k(root, spec=spec)
    assert c.splits["train"] == _expected("train")


# ---------------------------------------------------------------------------------------------------------
# IWSLT 2017 fixtures: two talks with metadata lines, XML with entities, all six test sets
# ---------------------------------------------------------------------------------------------------------

TALKS = [
    ("1", ["Hello, world.", "", "It's 5 < 6 & fine."], ["Hallo, Welt.", "", "Es ist 5 < 6 & gut."]),
    ("2", ["Thank you."], ["Danke."]),
]
META = ("url", "keywords", "speaker", "talkid", "title", "description")


def _train_tags(lang: str) -> bytes:
    lines = []
    for talkid, en, de in TALKS:
        lines += [f"<{tag}>{talkid if tag == 'talkid' else f'{tag} {lang}'}</{tag}>" for tag in META]
        lines += en if lang == "en" else de
        lines += ["<reviewer></reviewer>", "<translator></translator>"]
    return ("\r\n".join(lines) + "\r\n").encode()


# set -> [(docid, [(seg id, en escaped, de escaped)])]
SEGS = {
    "dev2010": [
        (
            "535",
            [
                ("1", " Tom &amp; Jerry &quot;hi&quot; &lt;3 ", "Tom &amp; Jerry &quot;hallo&quot;"),
                ("2", "It&apos;s", "Es ist &#233;t&#xE9;"),
            ],
        ),
        ("536", [("1", "Bye.", "Tschüss.")]),
    ],
    **{
        f"tst{y}": [(str(y), [("1", f"Test {y} &gt; all.", f"Test {y} &gt; alle.")])]
        for y in range(2010, 2016)
    },
}
UNESCAPED = {
    "dev2010": (['Tom & Jerry "hi" <3', "It's", "Bye."], ['Tom & Jerry "hallo"', "Es ist été", "Tschüss."]),
    **{f"tst{y}": ([f"Test {y} > all."], [f"Test {y} > alle."]) for y in range(2010, 2016)},
}


def _xml(set_name: str, lang: str) -> bytes:
    kind = "srcset" if lang == "en" else "refset"
    out = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", f'<{kind} setid="iwslt2017-{set_name}">']
    for docid, segs in SEGS[set_name]:
        out += [f'<doc docid="{docid}" genre="lectures">', "<url>http://www.ted.com/talks/x</url>"]
        out += ["<talkid>7</talkid>", "<description>TED Talk Subtitles &amp; Transcript</description>"]
        out += [f'<seg id="{sid}">{en if lang == "en" else de}</seg>' for sid, en, de in segs]
        out.append("</doc>")
    out += [f"</{kind}>", "</mteval>"]
    return ("\n".join(out) + "\n").encode()


def iwslt_files() -> dict[str, bytes]:
    files = {f"train.tags.en-de.{lang}": _train_tags(lang) for lang in ("en", "de")}
    for set_name in SEGS:
        for lang in ("en", "de"):
            files[f"IWSLT17.TED.{set_name}.en-de.{lang}.xml"] = _xml(set_name, lang)
    files["README"] = b"IWSLT 2017 evaluation campaign: training/development\n"
    return files


def write_iwslt(root: Path, layout: str, files: dict[str, bytes] | None = None) -> Path:
    files = iwslt_files() if files is None else files
    root.mkdir(parents=True, exist_ok=True)
    if layout == "folder":
        for name, data in files.items():
            (root / "en-de").mkdir(exist_ok=True)
            (root / "en-de" / name).write_bytes(data)
        return root / "en-de"
    if layout == "tgz":
        return _tar(root / "en-de.tgz", {f"en-de/{n}": d for n, d in files.items()})
    path = root / "en-de.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(f"en-de/{name}", data)
        zf.writestr("__MACOSX/en-de/._train.tags.en-de.en", b"\x00junk")
    return path


TRAIN_EN = ["Hello, world.", "", "It's 5 < 6 & fine.", "Thank you."]
TRAIN_DE = ["Hallo, Welt.", "", "Es ist 5 < 6 & gut.", "Danke."]


# ---------------------------------------------------------------------------------------------------------
# IWSLT 2017
# ---------------------------------------------------------------------------------------------------------


def test_parse_segments_is_robust():
    text = "<doc docid='9'>\n<seg   id = \"3\" >  a &amp;\n b </seg>\n<SEG id=4>&#x263A;</SEG>\n</doc>"
    assert parse_segments(text) == [("9", "3", "a & b"), ("9", "4", "\u263a")]


@pytest.mark.parametrize("layout, sub", [("folder", "iwslt2017"), ("tgz", "iwslt"), ("zip", "")])
def test_iwslt_layouts(tmp_path, layout, sub):
    path = write_iwslt(tmp_path / sub if sub else tmp_path, layout)
    c = load_iwslt2017(tmp_path)
    assert (c.name, c.layout, c.test_name, c.source) == ("iwslt2017", layout, "tst2010", str(path))
    assert c.splits["train"] == (TRAIN_EN, TRAIN_DE)  # metadata lines gone, the empty pair kept
    assert c.splits["val"] == UNESCAPED["dev2010"]
    assert c.splits["test"] == UNESCAPED["tst2010"]
    kind = LAYOUTS["folder"] if layout == "folder" else "archive"
    assert c.description() == (
        f"IWSLT 2017 en-de (Cettolo et al. 2017) from the {kind} {path}: 4 train / 3 val / 1 tst2010"
    )
    assert any("not verified" in n or "unverified" in n for n in c.notes)
    de_en = load_iwslt2017(tmp_path, "de", "en", test_set="tst2013")
    assert (
        de_en.splits["train"] == (TRAIN_DE, TRAIN_EN) and de_en.splits["test"] == UNESCAPED["tst2013"][::-1]
    )


def test_iwslt_search_order_and_forced_layout(tmp_path):
    write_iwslt(tmp_path / "iwslt", "zip")
    write_iwslt(tmp_path, "tgz")
    assert load_iwslt2017(tmp_path).layout == "tgz"
    write_iwslt(tmp_path / "iwslt2017", "folder")
    assert load_iwslt2017(tmp_path).layout == "folder"
    assert load_iwslt2017(tmp_path, layout="zip").source == str(tmp_path / "iwslt" / "en-de.zip")
    assert load_iwslt2017(tmp_path / "iwslt2017" / "en-de").layout == "folder"  # the folder itself as root
    with pytest.raises(ValueError, match="unknown IWSLT 2017 layout 'csv'; choose from folder, tgz, zip, hf"):
        load_iwslt2017(tmp_path, layout="csv")
    with pytest.raises(DataMissingError, match='layout="tgz" was asked for'):
        load_iwslt2017(tmp_path / "iwslt", layout="tgz")


def test_iwslt_test_sets(tmp_path):
    write_iwslt(tmp_path, "tgz")
    c = load_iwslt2017(tmp_path, test_set=IWSLT_ALL_TESTS)
    assert c.splits["test"][0] == [f"Test {y} > all." for y in range(2010, 2016)]
    with pytest.raises(
        ValueError, match="unknown IWSLT 2017 test set 'tst2016'; the published ones are tst2010"
    ):
        load_iwslt2017(tmp_path, test_set="tst2016")
    files = {n: d for n, d in iwslt_files().items() if "tst2012" not in n}
    write_iwslt(tmp_path / "part", "folder", files)
    with pytest.raises(
        ValueError, match="test sets found there: tst2010, tst2011, tst2013, tst2014, tst2015 "
    ):
        load_iwslt2017(tmp_path / "part", test_set="tst2012")
    with pytest.raises(ValueError, match="tst2010-2015"):
        load_iwslt2017(tmp_path / "part", test_set=IWSLT_ALL_TESTS)
    files = {n: d for n, d in iwslt_files().items() if "dev2010.en-de.de" not in n}
    write_iwslt(tmp_path / "nodev", "zip", files)
    with pytest.raises(DataMissingError, match=r"lacks IWSLT17\.TED\.dev2010\.en-de\.de\.xml"):
        load_iwslt2017(tmp_path / "nodev")


def test_iwslt_alignment_is_checked(tmp_path):
    files = iwslt_files()
    files["train.tags.en-de.de"] = files["train.tags.en-de.de"].replace(
        b"<speaker>speaker de</speaker>", b"Ann"
    )
    write_iwslt(tmp_path / "a", "folder", files)
    with pytest.raises(DataCorruptError, match="line 3 is a metadata line on one side only"):
        load_iwslt2017(tmp_path / "a")
    files = iwslt_files()
    files["train.tags.en-de.en"] += b"One more.\n"
    write_iwslt(tmp_path / "b", "tgz", files)
    with pytest.raises(DataCorruptError, match=r"train\.tags\.en-de\.en has 21 lines but .* has 20"):
        load_iwslt2017(tmp_path / "b")
    files = iwslt_files()
    files["IWSLT17.TED.dev2010.en-de.de.xml"] = files["IWSLT17.TED.dev2010.en-de.de.xml"].replace(
        b'<seg id="2">', b'<seg id="5">'
    )
    write_iwslt(tmp_path / "c", "zip", files)
    with pytest.raises(
        DataCorruptError, match=r"dev2010: .* first difference at segment 2 \(doc 535 seg 2 vs"
    ):
        load_iwslt2017(tmp_path / "c")


def test_iwslt_non_utf8_and_damaged_archive(tmp_path):
    files = iwslt_files()
    files["IWSLT17.TED.tst2010.en-de.de.xml"] = b'<seg id="1">gr\xfc\xdf</seg>\n'
    path = write_iwslt(tmp_path, "zip", files)
    with pytest.raises(
        DataCorruptError, match=rf"{path}:en-de/IWSLT17\.TED\.tst2010\.en-de\.de\.xml: not UTF-8"
    ):
        load_iwslt2017(tmp_path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataCorruptError, match="damaged archive"):
        load_iwslt2017(tmp_path)


def test_iwslt_missing_data_error(tmp_path):
    with pytest.raises(DataMissingError) as info:
        load_iwslt2017(tmp_path / "empty")
    msg = str(info.value)
    for part in (
        "en-de.tgz",
        "en-de.zip",
        str(tmp_path / "empty" / "iwslt2017" / "en-de" / "train.tags.en-de.en"),
        str(tmp_path / "empty" / "iwslt" / "en-de.tgz"),
        WIT3_URL,
        HF_URL,
        "data/2017-01-trnted/texts/en/de/en-de.zip",
        "pip install datasets",
        "llmlab data download iwslt2017",
    ):
        assert part in msg, part
    assert info.value.dataset == "iwslt2017"


def test_iwslt_hugging_face_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(
        DataMissingError, match="needs the optional `datasets` package: `pip install datasets`"
    ):
        load_iwslt2017(layout="hf", test_set=IWSLT_ALL_TESTS)
    with pytest.raises(ValueError, match="one test split, tst2010-2015 concatenated"):
        load_iwslt2017(layout="hf")  # its test split cannot give tst2010 alone
    with pytest.raises(DataMissingError, match="no accepted layout"):  # nothing local: no fallback without it
        load_iwslt2017(tmp_path, test_set=IWSLT_ALL_TESTS)


def test_iwslt_hugging_face_mapping_with_a_stand_in(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        row = {"en": "A &amp; B ", "de": " A &amp; B"}
        return {
            "train": {"translation": [{"en": " Hi & you ", "de": "Hallo"}]},
            "validation": {"translation": [row]},
            "test": {"translation": [row, {"en": "x", "de": "y"}]},
        }

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    c = load_iwslt2017(tmp_path, "de", "en", test_set=IWSLT_ALL_TESTS)  # nothing local: falls back to HF
    assert calls == [("IWSLT/iwslt2017", "iwslt2017-en-de")] and c.layout == "hf"
    assert c.splits == {
        "train": (["Hallo"], ["Hi & you"]),
        "val": (["A & B"], ["A & B"]),
        "test": (["A & B", "y"], ["A & B", "x"]),
    }
    assert c.description().endswith(
        "from Hugging Face datasets IWSLT/iwslt2017 (iwslt2017-en-de): 1 train / 1 val / 2 tst2010-2015"
    )
    with pytest.raises(DataMissingError, match='pass test_set="tst2010-2015" to use it'):
        load_iwslt2017(tmp_path)  # installed, but the default test set is not in its copy


def test_iwslt_status_and_download(tmp_path, no_proxy):
    st = dataset_status(IWSLT2017, tmp_path / "none")
    assert st.state == "missing" and [f.name for f in st.files] == ["en-de.tgz"]
    write_iwslt(tmp_path / "f", "folder")
    st = dataset_status(IWSLT2017, tmp_path / "f")
    assert st.state == "present" and st.layout.startswith(LAYOUTS["folder"]) and len(st.files) == 16
    assert all(f.ok is None for f in st.files)
    (tmp_path / "f" / "en-de" / "IWSLT17.TED.tst2015.en-de.de.xml").unlink()
    assert dataset_status(IWSLT2017, tmp_path / "f").state == "partial"
    served = write_iwslt(tmp_path / "served", "tgz")
    st = dataset_status(IWSLT2017, tmp_path / "served")
    assert st.state == "present" and "not Hugging Face's copy (unverified)" in st.layout  # not a corrupt one
    sha = hashlib.sha256(served.read_bytes()).hexdigest()
    spec = dataclasses.replace(IWSLT2017, files=(FileSpec("en-de.tgz", sha256=sha, raw=True),))
    root = tmp_path / "root"
    with serve(served.parent) as url:
        assert download_dataset(spec, root, mirrors=[url], progress=False) == root / "iwslt2017"
    st = dataset_status(spec, root)
    assert st.state == "present" and st.files[0].ok and st.layout == LAYOUTS["tgz"]
    c = load_iwslt2017(root, spec=spec)
    assert c.splits["train"] == (TRAIN_EN, TRAIN_DE) and "Hugging Face's copy" in c.notes[0]
    # a file that is not the archive is refused by the download check, nothing left behind
    bad = tmp_path / "bad" / "en-de.tgz"
    _tar(bad, {"en-de/README": b"nothing here"})
    spec = dataclasses.replace(IWSLT2017, files=(FileSpec("en-de.tgz", raw=True),))
    with serve(bad.parent) as url, pytest.raises(DataDownloadError, match="lacks IWSLT17.TED.dev2010"):
        download_dataset(spec, tmp_path / "root2", mirrors=[url], progress=False)
    assert not (tmp_path / "root2" / "iwslt2017" / "en-de.tgz").exists()


def test_specs_are_registered():
    assert DATASETS["multi30k"] is MULTI30K and DATASETS["iwslt2017"] is IWSLT2017
    assert [f.name for f in MULTI30K.files] == [f"{s}.{lang}" for s in STEMS for lang in ("en", "de")]
    assert MULTI30K.mirrors[0] + MULTI30K.files[0].remote_name == MULTI30K_MIRROR + "train.en.gz"
    assert MULTI30K.subdirs == ("multi30k/raw", "multi30k", "multi30k/data/task1/raw", "")


# ---------------------------------------------------------------------------------------------------------
# The shared Multi30k copy (LLMLAB_DATA)
# ---------------------------------------------------------------------------------------------------------

_REAL: dict[str, object] = {}


def _snapshot(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture
def real(shared_data):
    if "corpus" not in _REAL:
        if not (shared_data / "multi30k" / "raw" / "train.en.gz").is_file():
            missing = f"no Multi30k copy under {shared_data}"
            if _require_data():
                pytest.fail(missing + " but LLMLAB_REQUIRE_DATA=1")
            pytest.skip(missing)
        folder = shared_data / "multi30k"
        _REAL["before"] = _snapshot(folder)
        _REAL["corpus"] = load_multi30k(shared_data)
        _REAL["de-en"] = load_multi30k(shared_data, "de", "en")
        _REAL["after"] = _snapshot(folder)
    return _REAL


def _first_line(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.readline().rstrip("\n")


def test_real_multi30k(real, shared_data):
    c = real["corpus"]
    assert (c.layout, c.test_name) == ("raw", "test_2016_flickr")
    counts = {s: (len(c.splits[s][0]), len(c.splits[s][1])) for s in ("train", "val", "test")}
    assert counts == {"train": (29000, 29000), "val": (1014, 1014), "test": (1000, 1000)}
    assert c.notes == ["checksums verified (sha256 of the decompressed content)"]
    raw = shared_data / "multi30k" / "raw"
    assert c.pairs("train")[0] == (_first_line(raw / "train.en.gz"), _first_line(raw / "train.de.gz"))
    assert c.pairs("test")[0] == (
        _first_line(raw / "test_2016_flickr.en.gz"),
        _first_line(raw / "test_2016_flickr.de.gz"),
    )
    assert c.description() == (
        f"Multi30k en-de (Elliott et al. 2016) from the raw files in {raw}: 29000 train / 1014 val / "
        "1000 test_2016_flickr"
    )
    de_en = real["de-en"]
    for split in ("train", "val", "test"):
        assert de_en.splits[split] == c.splits[split][::-1]
    assert real["after"] == real["before"]  # nothing written under the data root


def test_real_multi30k_status(real, shared_data):
    st = dataset_status("multi30k", shared_data)
    assert st.state == "present" and st.layout == "raw files"
    assert [f.ok for f in st.files] == [True] * 6
    assert "6/6 found, 6 checksum ok (raw files)" in format_status([st])
