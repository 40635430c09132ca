import io

import pytest

from workers.storage import (ObjectNotFound, TooLarge, delete_prefix, download_prefix, get_bytes,
                             put_bytes, sha256_of, upload_dir)


def test_roundtrip_checksum_and_listing(object_store, tmp_path):
    res = put_bytes(object_store, "a/b/one.txt", b"hello")
    assert res.bytes == 5
    assert res.sha256 == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    put_bytes(object_store, "a/two.txt", b"x" * 10)
    assert object_store.list("a/") == ["a/b/one.txt", "a/two.txt"]
    assert get_bytes(object_store, "a/b/one.txt") == b"hello"
    assert sha256_of(object_store, "a/b/one.txt") == (res.sha256, 5)
    out = download_prefix(object_store, "a", tmp_path / "dl")
    assert (out / "b" / "one.txt").read_bytes() == b"hello"
    assert delete_prefix(object_store, "a/") == 2
    assert object_store.list("a/") == []
    assert not object_store.exists("a/two.txt")


def test_missing_object_and_limits(object_store, tmp_path):
    with pytest.raises(ObjectNotFound):
        object_store.open("nope/x")
    with pytest.raises(TooLarge):
        object_store.put_stream("big/x", io.BytesIO(b"y" * 100), limit=10)
    assert not object_store.exists("big/x")
    with pytest.raises(ValueError):
        put_bytes(object_store, "../escape", b"")


def test_multipart_upload_of_a_large_object(s3_store, tmp_path):
    data = bytes(range(256)) * (40 * 4096)  # 40 MiB: above the 16 MiB multipart threshold
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "big.bin").write_bytes(data)
    res = upload_dir(s3_store, tmp_path / "d", "blobs")
    assert res["big.bin"].bytes == len(data)
    assert sha256_of(s3_store, "blobs/big.bin")[0] == res["big.bin"].sha256
