"""ray_cifar.storage on real files: paths and file:// URIs through pyarrow's local filesystem."""

from __future__ import annotations

import multiprocessing
import os

import pyarrow.fs as pafs
import pytest

from ray_cifar import storage
from ray_cifar.storage import StorageError


@pytest.fixture
def data_uri(tmp_path):
    folder = tmp_path / "bucket" / "cifar10"
    folder.mkdir(parents=True)
    for name in storage.DATA_FILES:
        (folder / name).write_bytes(os.urandom(1000))
    (folder / "unrelated.bin").write_bytes(b"x")  # not copied: only the dataset's files are
    return folder.as_uri()


@pytest.mark.parametrize("location, expected", [
    ("s3://bucket/x", True), ("gs://bucket/x", True), ("file:///data/x", True),
    ("/data/x", False), ("data/x", False), ("~/x", False), ("C:\\x", False)])
def test_is_uri(location, expected):
    assert storage.is_uri(location) is expected


def test_local_path():
    assert storage.local_path("file:///mnt/shared/my%20data") == "/mnt/shared/my data"
    assert storage.local_path("results/x") == os.path.abspath("results/x")
    assert storage.local_path("s3://bucket/x") is None


def test_join():
    assert storage.join("s3://bucket/study", "ray", "tune") == "s3://bucket/study/ray/tune"
    assert storage.join("/out", "ray") == os.path.join("/out", "ray")


def test_fetch_data_copies_a_uri_once_and_reuses_the_copy(tmp_path, data_uri):
    cache = tmp_path / "cache"
    first = storage.fetch_data(data_uri, str(cache))
    assert sorted(os.listdir(first)) == sorted(storage.DATA_FILES)
    assert str(first).startswith(str(cache))
    source = storage.local_path(data_uri)
    for name in storage.DATA_FILES:
        assert open(os.path.join(first, name), "rb").read() == open(os.path.join(source, name), "rb").read()
    marker = os.path.join(first, "train.parquet")
    os.utime(marker, (1, 1))  # a second call must not copy again (it would reset this mtime)
    assert storage.fetch_data(data_uri, str(cache)) == first
    assert os.stat(marker).st_mtime == 1
    assert os.listdir(cache / "data") == [os.path.basename(first)]  # no staging folders left


def test_fetch_data_fetches_again_when_the_source_changes(tmp_path, data_uri):
    cache = str(tmp_path / "cache")
    first = storage.fetch_data(data_uri, cache)
    with open(os.path.join(storage.local_path(data_uri), "test.parquet"), "ab") as f:
        f.write(b"more")
    second = storage.fetch_data(data_uri, cache)
    assert second != first and os.path.getsize(os.path.join(second, "test.parquet")) == 1004


def test_fetch_data_returns_a_plain_path_unchanged(tmp_path):
    assert storage.fetch_data(str(tmp_path), str(tmp_path / "cache")) == str(tmp_path)
    assert not (tmp_path / "cache").exists()


def test_fetch_data_names_the_missing_file(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"x")
    with pytest.raises(StorageError, match="test.parquet"):
        storage.fetch_data(tmp_path.as_uri(), str(tmp_path / "cache"))


def _fetch(args):
    return storage.fetch_data(*args)


def test_fetch_data_is_safe_when_processes_race(tmp_path, data_uri):
    cache = str(tmp_path / "cache")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_fetch, [(data_uri, cache)] * 8)
    assert len(set(results)) == 1
    assert sorted(os.listdir(results[0])) == sorted(storage.DATA_FILES)
    assert os.listdir(os.path.join(cache, "data")) == [os.path.basename(results[0])]


def test_sync_up_copies_results_to_a_uri_and_overwrites(tmp_path):
    local = tmp_path / "local"
    (local / "ray").mkdir(parents=True)
    (local / "results.parquet").write_text("v1")
    (local / "ray" / "state.json").write_text("{}")
    target = (tmp_path / "shared" / "study").as_uri()
    storage.sync_up(str(local), target)
    (local / "results.parquet").write_text("v2")
    storage.sync_up(str(local), target)
    remote = tmp_path / "shared" / "study"
    assert (remote / "results.parquet").read_text() == "v2"
    assert (remote / "ray" / "state.json").read_text() == "{}"


def test_sync_up_with_a_record_copies_only_what_changed_and_no_file_being_written(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "shared" / "study"
    (local / "tb").mkdir(parents=True)
    (local / "a.parquet").write_text("a1")
    (local / "tb" / "events").write_text("e1")
    (local / "trials.json.tmp").write_text("half")
    (local / "part.parquet.tmp-123").write_text("half")
    copied: dict = {}
    storage.sync_up(str(local), remote.as_uri(), copied)
    assert sorted(copied) == ["a.parquet", "tb/events"]
    assert not (remote / "trials.json.tmp").exists() and not (remote / "part.parquet.tmp-123").exists()
    (remote / "tb" / "events").write_text("copied before")  # a second copy of it would overwrite this
    (local / "a.parquet").write_text("a2, longer")
    (local / "b.parquet").write_text("b1")
    storage.sync_up(str(local), remote.as_uri(), copied)
    assert (remote / "a.parquet").read_text() == "a2, longer" and (remote / "b.parquet").read_text() == "b1"
    assert (remote / "tb" / "events").read_text() == "copied before"


def test_a_bucket_uri_names_the_path_pyarrow_does_with_one_filesystem_per_bucket(monkeypatch):
    """filesystem() keeps one pyarrow filesystem per bucket (making one asks the bucket for its region) and names
    the path in it itself: the same path pyarrow's from_uri gives."""
    for k, v in {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)  # nothing is asked of it: no bucket is read
    uris = ["s3://bkt/study", "s3://bkt/study/", "s3://bkt", "s3://bkt/a%20b/c.parquet", "s3://bkt/x?region=eu-west-1"]
    for uri in uris:
        assert storage.filesystem(uri)[1] == pafs.FileSystem.from_uri(uri)[1]
    first = storage.filesystem("s3://bkt/a")[0]
    assert storage.filesystem("s3://bkt/b/c")[0] is first and storage.filesystem("s3://other/a")[0] is not first
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone else")  # other credentials: another filesystem
    assert storage.filesystem("s3://bkt/a")[0] is not first


def test_is_empty(tmp_path):
    assert storage.is_empty((tmp_path / "missing").as_uri())
    assert storage.is_empty(str(tmp_path))
    (tmp_path / "f").write_text("x")
    assert not storage.is_empty(tmp_path.as_uri())
    assert not storage.is_empty(str(tmp_path / "f"))


def test_check_output_shared():
    storage.check_output_shared("/local/out", num_nodes=1)
    for uri in ("s3://bucket/out", "gs://bucket/out", "file:///mnt/shared/out"):
        storage.check_output_shared(uri, num_nodes=3)
    with pytest.raises(StorageError, match="checkpoints .* would be lost") as e:
        storage.check_output_shared("/local/out", num_nodes=2)
    assert "\n" not in str(e.value) and "2 nodes" in str(e.value)


def test_unknown_scheme_is_one_clear_error():
    with pytest.raises(StorageError, match="cannot open nosuch://x"):
        storage.filesystem("nosuch://x")


def test_sync_down_restores_a_study_folder_but_leaves_rays_files(tmp_path):
    from ray_cifar.storage import sync_down

    remote = tmp_path / "remote"
    (remote / "results.parts").mkdir(parents=True)
    (remote / "ray" / "tune").mkdir(parents=True)
    (remote / "config.yaml").write_text("a: 1\n")
    (remote / "results.parts" / "part-000000.parquet").write_bytes(b"x")
    (remote / "ray" / "tune" / "tuner.pkl").write_bytes(b"big")
    sync_down(str(remote), str(tmp_path / "local"))
    got = sorted(str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert got == ["config.yaml", "results.parts/part-000000.parquet"]


def test_upload_one_file_and_prune_what_compaction_merged(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    (local / "results.parts").mkdir(parents=True)
    for n in (0, 1):
        (local / "results.parts" / f"part-00000{n}.parquet").write_text(f"rows {n}")
        storage.upload(str(local / "results.parts" / f"part-00000{n}.parquet"), remote.as_uri(),
                       f"results.parts/part-00000{n}.parquet")
    assert (remote / "results.parts" / "part-000001.parquet").read_text() == "rows 1"
    (local / "results.parts" / "part-000000.parquet").unlink()  # merged into results.parquet
    (remote / "other").mkdir()
    (remote / "other" / "kept").write_text("x")
    storage.prune(str(local), remote.as_uri(), "results.parts")
    assert [p.name for p in (remote / "results.parts").iterdir()] == ["part-000001.parquet"]
    assert (remote / "other" / "kept").exists()  # only the folder named is pruned


def test_a_path_inside_a_filesystem_becomes_a_location_ray_cifar_opens():
    import pyarrow.fs as pafs

    # Ray Train's Checkpoint.path on a bucket is 'bucket/...', without its scheme.
    s3 = pafs.S3FileSystem(region="us-east-1", anonymous=True)
    assert storage.location_in(s3, "bkt/study/ray/trial-1/checkpoint_x") == "s3://bkt/study/ray/trial-1/checkpoint_x"
    assert storage.location_in(pafs.LocalFileSystem(), "/out/ray/trial-1") == "/out/ray/trial-1"
    assert storage.location_in(s3, "s3://bkt/x") == "s3://bkt/x"
    with pytest.raises(StorageError, match="as a URI"):
        storage.location_in(pafs.SubTreeFileSystem("/tmp", pafs.LocalFileSystem()), "x")
