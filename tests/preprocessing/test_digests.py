"""Checkpoint digests are computed once per file version and remembered across processes."""

import hashlib
import json

import pytest

from plumbing import digests


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HMIL_CACHE_DIR", str(tmp_path / "cache"))
    digests._cached_sha256.cache_clear()  # as a new process would start
    yield tmp_path / "cache" / "sha256.json"
    digests._cached_sha256.cache_clear()


def checkpoint(tmp_path, content: bytes):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    return path


def test_digest_is_the_files_sha256_and_is_remembered(cache, tmp_path):
    path = checkpoint(tmp_path, b"weights" * 1000)
    assert digests.file_sha256(path) == hashlib.sha256(b"weights" * 1000).hexdigest()
    ((key, value),) = json.loads(cache.read_text()).items()
    assert key.startswith(f"{path.resolve()}|7000|") and value == digests.file_sha256(path)


def test_a_later_process_reads_the_digest_instead_of_hashing(cache, tmp_path):
    path = checkpoint(tmp_path, b"weights")
    digests.file_sha256(path)
    # Plant another digest under the same key: a fresh process must return it unread.
    entries = json.loads(cache.read_text())
    entries = {key: "f" * 64 for key in entries}
    cache.write_text(json.dumps(entries))
    digests._cached_sha256.cache_clear()
    assert digests.file_sha256(path) == "f" * 64


def test_a_changed_file_is_hashed_again(cache, tmp_path):
    path = checkpoint(tmp_path, b"old weights")
    first = digests.file_sha256(path)
    path.write_bytes(b"new weights, longer")
    assert digests.file_sha256(path) == hashlib.sha256(b"new weights, longer").hexdigest()
    assert digests.file_sha256(path) != first
    assert len(json.loads(cache.read_text())) == 2


def test_a_damaged_cache_is_ignored_and_rewritten(cache, tmp_path):
    cache.parent.mkdir()
    cache.write_text("{not json")
    path = checkpoint(tmp_path, b"weights")
    assert digests.file_sha256(path) == hashlib.sha256(b"weights").hexdigest()
    assert list(json.loads(cache.read_text()).values()) == [digests.file_sha256(path)]


def test_an_unwritable_cache_still_gives_the_digest(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("HMIL_CACHE_DIR", str(blocker / "cache"))
    digests._cached_sha256.cache_clear()
    path = checkpoint(tmp_path, b"weights")
    assert digests.file_sha256(path) == hashlib.sha256(b"weights").hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder", "weights.pth"]
    digests._cached_sha256.cache_clear()
