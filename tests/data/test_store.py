"""Data root, cache, specs, verification (and its cache), status, download (over a loopback HTTP server)."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llmlab.data import store
from llmlab.data.store import (
    DATASETS,
    DataCorruptError,
    DataDownloadError,
    DataMissingError,
    DatasetSpec,
    FileSpec,
    cache_dir,
    data_root,
    data_root_source,
    dataset_status,
    download_dataset,
    find_file,
    format_status,
    locate_dataset,
    verify_file,
)

# A tiny two-file dataset, so these tests need no real data.
CONTENT = {"alpha.bin": b"alpha content\n" * 100, "beta.bin": bytes(range(256)) * 40}


def _fspec(name: str) -> FileSpec:
    data = CONTENT[name]
    return FileSpec(name, hashlib.sha256(data).hexdigest(), len(data))


TINY = DatasetSpec(
    name="tiny-test",
    description="two small files for tests",
    subdirs=("tiny", "TINY/raw"),
    files=(_fspec("alpha.bin"), _fspec("beta.bin")),
    mirrors=("http://127.0.0.1:9/never-used/",),
)


def _write(path: Path, data: bytes, gz: bool, mtime: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=mtime) if gz else data)
    return path


def _populate(root: Path, names=("alpha.bin", "beta.bin"), gz: bool = True) -> None:
    for n in names:
        _write(root / "tiny" / (n + ".gz" if gz else n), CONTENT[n], gz)


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------------------------------------


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMLAB_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "llmlab"
    assert data_root_source()[1] == "default"
    monkeypatch.setenv("LLMLAB_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root_source()[1] == "env LLMLAB_DATA"
    assert data_root(tmp_path / "flag") == tmp_path / "flag"
    assert data_root(str(tmp_path / "flag")) == tmp_path / "flag"
    assert data_root_source(tmp_path / "flag")[1] == "--data-dir"
    assert data_root("~/x") == tmp_path / "home" / "x"  # expanduser
    assert not (tmp_path / "flag").exists()  # not created


def test_cache_dir_env_and_created(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "c" / "d"))
    assert cache_dir() == tmp_path / "c" / "d"
    assert cache_dir().is_dir()
    monkeypatch.delenv("LLMLAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "llmlab" / "derived"


def test_registry_has_mnist_and_bundled_digits():
    assert "mnist" in DATASETS and "digits" in DATASETS
    assert DATASETS["digits"].bundled
    assert dataset_status("digits").state == "bundled"
    with pytest.raises(KeyError, match="known datasets"):
        store.get_spec("no-such-dataset")


def test_find_file_order_gz_and_plain(tmp_path):
    a = TINY.files[0]
    assert find_file(TINY, a, tmp_path) is None
    plain_alt = _write(tmp_path / "TINY" / "raw" / "alpha.bin", CONTENT["alpha.bin"], gz=False)
    assert find_file(TINY, a, tmp_path) == plain_alt
    plain = _write(tmp_path / "tiny" / "alpha.bin", CONTENT["alpha.bin"], gz=False)
    assert find_file(TINY, a, tmp_path) == plain  # first subdir wins
    gz = _write(tmp_path / "tiny" / "alpha.bin.gz", CONTENT["alpha.bin"], gz=True)
    assert find_file(TINY, a, tmp_path) == gz  # .gz before plain in the same folder


# ---------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------


def test_verify_decompressed_content(tmp_path):
    a = TINY.files[0]
    data = CONTENT["alpha.bin"]
    plain = _write(tmp_path / "p" / "alpha.bin", data, gz=False)
    gz1 = _write(tmp_path / "g1" / "alpha.bin.gz", data, gz=True, mtime=0)
    gz2 = _write(tmp_path / "g2" / "alpha.bin.gz", data, gz=True, mtime=123456)  # other gzip header
    assert gz1.read_bytes() != gz2.read_bytes()
    for p in (plain, gz1, gz2):
        assert verify_file(p, a) == a.sha256
    # gzip is detected by magic bytes, not by name
    hidden = tmp_path / "h" / "alpha.bin"
    hidden.parent.mkdir()
    hidden.write_bytes(gz1.read_bytes())
    assert verify_file(hidden, a) == a.sha256


def test_corrupt_file_raises_with_both_checksums(tmp_path):
    a = TINY.files[0]
    bad = _write(tmp_path / "tiny" / "alpha.bin.gz", b"something else", gz=True)
    with pytest.raises(DataCorruptError) as info:
        verify_file(bad, a)
    msg = str(info.value)
    assert str(bad) in msg and a.sha256 in msg and hashlib.sha256(b"something else").hexdigest() in msg
    assert "delete" in msg and "download" in msg
    assert isinstance(info.value, ValueError)
    # a broken gzip stream is reported as corrupt too
    broken = tmp_path / "broken" / "alpha.bin.gz"
    broken.parent.mkdir()
    broken.write_bytes(gzip.compress(CONTENT["alpha.bin"])[:40])
    with pytest.raises(DataCorruptError, match="cannot decompress"):
        verify_file(broken, a)


def test_verification_cache_skips_rehash_and_notices_changes(tmp_path, monkeypatch):
    a = TINY.files[0]
    path = _write(tmp_path / "alpha.bin", CONTENT["alpha.bin"], gz=False)
    calls = []
    real = store.content_sha256

    def counting(p):
        calls.append(Path(p))
        return real(p)

    monkeypatch.setattr(store, "content_sha256", counting)
    verify_file(path, a)
    verify_file(path, a)
    dataset_status(TINY, tmp_path)  # status does not find this file (wrong folder); just must not crash
    assert calls == [path]
    assert (cache_dir() / "verified-sha256.json").is_file()

    # same size, other content, other mtime: re-hashed and reported corrupt
    data = bytearray(CONTENT["alpha.bin"])
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataCorruptError):
        verify_file(path, a)
    assert len(calls) == 2
    with pytest.raises(DataCorruptError):  # still corrupt, from the cache
        verify_file(path, a)
    assert len(calls) == 2


def test_verification_cache_survives_a_damaged_cache_file(tmp_path):
    a = TINY.files[0]
    path = _write(tmp_path / "alpha.bin", CONTENT["alpha.bin"], gz=False)
    (cache_dir() / "verified-sha256.json").write_text("{not json")
    assert verify_file(path, a) == a.sha256
    assert verify_file(path, a) == a.sha256


# ---------------------------------------------------------------------------------------------------------
# Missing data and status
# ---------------------------------------------------------------------------------------------------------


def test_missing_dataset_error_names_files_and_fix(tmp_path):
    _populate(tmp_path, names=("alpha.bin",))
    with pytest.raises(DataMissingError) as info:
        locate_dataset(TINY, tmp_path)
    err = info.value
    msg = str(err)
    assert isinstance(err, FileNotFoundError)
    assert err.missing == ["beta.bin"]
    assert "beta.bin" in msg and "alpha.bin" not in msg
    assert str(tmp_path / "tiny" / "beta.bin.gz") in msg
    assert str(tmp_path / "TINY" / "raw" / "beta.bin") in msg
    assert "llmlab data status" in msg and "llmlab data download tiny-test" in msg
    assert "LLMLAB_DATA" in msg and "http://127.0.0.1:9/never-used/beta.bin.gz" in msg


def test_locate_dataset_finds_and_verifies(tmp_path):
    _populate(tmp_path)
    paths = locate_dataset(TINY, tmp_path)
    assert paths == {n: tmp_path / "tiny" / (n + ".gz") for n in ("alpha.bin", "beta.bin")}


def test_status_states_and_table(tmp_path):
    assert dataset_status(TINY, tmp_path).state == "missing"
    _populate(tmp_path, names=("alpha.bin",))
    st = dataset_status(TINY, tmp_path)
    assert st.state == "partial"
    assert [(f.name, f.ok) for f in st.files] == [("alpha.bin", True), ("beta.bin", None)]
    _populate(tmp_path, names=("beta.bin",))
    st = dataset_status(TINY, tmp_path)
    assert st.state == "present" and all(f.ok for f in st.files)
    assert st.root == tmp_path and st.root_source == "--data-dir"
    _write(tmp_path / "tiny" / "beta.bin.gz", b"garbage", gz=True)
    st = dataset_status(TINY, tmp_path)
    assert st.state == "corrupt"
    unchecked = dataset_status(TINY, tmp_path, verify=False)
    assert unchecked.state == "present" and all(f.ok is None for f in unchecked.files)

    table = format_status([st, dataset_status("digits", tmp_path)])
    assert str(tmp_path) in table and "--data-dir" in table
    assert "tiny-test" in table and "corrupt" in table and "digits" in table and "bundled" in table
    assert "llmlab data download tiny-test" in table


def test_status_reports_env_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_DATA", str(tmp_path))
    st = dataset_status(TINY)
    assert st.root == tmp_path and st.root_source == "env LLMLAB_DATA"
    assert "env LLMLAB_DATA" in format_status([st])


# ---------------------------------------------------------------------------------------------------------
# Download over a loopback HTTP server
# ---------------------------------------------------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - keep pytest output clean
        pass


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def no_proxy(monkeypatch):
    # keep loopback traffic off any configured proxy
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def mirror(tmp_path, no_proxy) -> Iterator[str]:
    folder = tmp_path / "served"
    for name, data in CONTENT.items():
        _write(folder / (name + ".gz"), data, gz=True, mtime=777)
    with serve(folder) as url:
        yield url


def dead_url() -> str:
    """A loopback URL on a port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_download_then_present(tmp_path, mirror):
    root = tmp_path / "root"
    out = download_dataset(TINY, root, mirrors=[mirror], progress=True)
    assert out == root / "tiny"
    assert _files_under(root) == [root / "tiny" / "alpha.bin.gz", root / "tiny" / "beta.bin.gz"]
    st = dataset_status(TINY, root)
    assert st.state == "present" and all(f.ok for f in st.files)
    assert locate_dataset(TINY, root)["beta.bin"] == root / "tiny" / "beta.bin.gz"


def test_download_skips_present_files(tmp_path, no_proxy):
    _populate(tmp_path)
    # every mirror is dead, yet nothing needs fetching
    assert download_dataset(TINY, tmp_path, mirrors=[dead_url()], progress=False) == tmp_path / "tiny"


def test_download_replaces_a_corrupt_file(tmp_path, mirror):
    _populate(tmp_path)
    _write(tmp_path / "tiny" / "alpha.bin.gz", b"garbage", gz=True)
    assert dataset_status(TINY, tmp_path).state == "corrupt"
    download_dataset(TINY, tmp_path, mirrors=[mirror], progress=False)
    assert dataset_status(TINY, tmp_path).state == "present"


def test_download_removes_a_shadowing_corrupt_copy(tmp_path, no_proxy):
    # the mirror serves plain content (saved as alpha.bin); a corrupt alpha.bin.gz would be found first
    folder = tmp_path / "served"
    _write(folder / "alpha.bin.gz", CONTENT["alpha.bin"], gz=False)
    root = tmp_path / "root"
    _populate(root, names=("beta.bin",))
    bad = _write(root / "tiny" / "alpha.bin.gz", b"garbage", gz=True)
    with serve(folder) as url:
        download_dataset(TINY, root, mirrors=[url], progress=False)
    assert not bad.exists()
    assert locate_dataset(TINY, root)["alpha.bin"] == root / "tiny" / "alpha.bin"


def test_download_falls_back_to_next_mirror(tmp_path, mirror):
    root = tmp_path / "root"
    download_dataset(TINY, root, mirrors=[dead_url(), mirror], progress=False)
    assert dataset_status(TINY, root).state == "present"


def test_download_mirror_from_env(tmp_path, mirror, monkeypatch):
    monkeypatch.setenv("LLMLAB_MIRROR_TINY_TEST", mirror)
    assert store.mirror_env_var("tiny-test") == "LLMLAB_MIRROR_TINY_TEST"
    root = tmp_path / "root"
    download_dataset(TINY, root, progress=False)
    assert dataset_status(TINY, root).state == "present"


def test_download_all_mirrors_dead(tmp_path, no_proxy):
    root = tmp_path / "root"
    urls = [dead_url(), dead_url()]
    with pytest.raises(DataDownloadError) as info:
        download_dataset(TINY, root, mirrors=urls, progress=False, timeout=5)
    msg = str(info.value)
    for u in urls:
        assert u + "alpha.bin.gz" in msg
    assert str(root / "tiny") in msg  # where to place the files by hand
    assert _files_under(root) == []


def test_download_wrong_content_leaves_nothing(tmp_path, no_proxy):
    folder = tmp_path / "served"
    for name in CONTENT:
        _write(folder / (name + ".gz"), b"not the right bytes", gz=True)
    root = tmp_path / "root"
    with serve(folder) as url, pytest.raises(DataDownloadError, match="sha256"):
        download_dataset(TINY, root, mirrors=[url], progress=False)
    assert _files_under(root) == []


def test_download_missing_on_server(tmp_path, no_proxy):
    folder = tmp_path / "served"
    folder.mkdir()
    root = tmp_path / "root"
    with serve(folder) as url, pytest.raises(DataDownloadError, match="404"):
        download_dataset(TINY, root, mirrors=[url], progress=False)
    assert _files_under(root) == []


def test_download_unwritable_root(tmp_path, no_proxy):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DataDownloadError, match="cannot write"):
        download_dataset(TINY, blocker / "root", mirrors=[dead_url()], progress=False)


def test_download_bundled_dataset_is_an_error():
    with pytest.raises(ValueError, match="bundled"):
        download_dataset("digits")


# ---------------------------------------------------------------------------------------------------------
# Real MNIST over loopback (copies of the shared files; the shared root itself is never written)
# ---------------------------------------------------------------------------------------------------------


def test_download_real_mnist_over_loopback(shared_data, tmp_path, no_proxy):
    from llmlab.data.mnist import MNIST

    served = tmp_path / "served"
    served.mkdir()
    for f in MNIST.files:
        shutil.copy(shared_data / "mnist" / f.remote_name, served / f.remote_name)
    root = tmp_path / "root"
    with serve(served) as url:
        out = download_dataset("mnist", root, mirrors=[dead_url(), url], progress=False)
    assert out == root / "mnist"
    assert sorted(p.name for p in _files_under(root)) == sorted(f.remote_name for f in MNIST.files)
    st = dataset_status("mnist", root)
    assert st.state == "present" and all(f.ok for f in st.files)


def test_errors_pickle(tmp_path):
    # exceptions cross process boundaries (DataLoader workers, multiprocessing): they must round-trip
    import pickle

    with pytest.raises(DataMissingError) as missing:
        locate_dataset(TINY, tmp_path)
    back = pickle.loads(pickle.dumps(missing.value))
    assert str(back) == str(missing.value)
    assert back.missing == ["alpha.bin", "beta.bin"] and back.dataset == "tiny-test"
    bad = _write(tmp_path / "tiny" / "alpha.bin", b"x", gz=False)
    with pytest.raises(DataCorruptError) as info:
        verify_file(bad, TINY.files[0], "tiny-test")
    back = pickle.loads(pickle.dumps(info.value))
    assert str(back) == str(info.value) and back.expected == TINY.files[0].sha256
    assert "llmlab data download tiny-test" in str(back)
