"""A study whose data and --output are bucket URIs, s3:// and gs://, on real servers on loopback (moto's S3 and
gcp-storage-emulator's GCS, in this process), and the head lost with its disk: the driver SIGKILLed, its local copy
of the output deleted, the study resumed from the URI alone: `--resume URI`, or (the DDP study) the first command
line with `--resume-if-exists`, as a retried KubeRay RayJob does on a new head.

Two 6-epoch trials, one after the other, of one rank (trained in the Tune trial process, checkpoints by
ray_cifar's store) and of two (DDP, a TorchTrainer, checkpoints by Ray Train); the driver dies while the second
trains. Checked: every row recorded before the kill was already at the URI (each results part is copied up as
written, not a minute later); after the kill the finished trial's last rows are also deleted from the bucket, and
the resumed study brings them back from Tune's last result and the trial's checkpoint, equal to the originals; the
second trial resumes from its checkpoint; every epoch of both trials is recorded once; the best trial is evaluated
on test from its checkpoint in the bucket (a DDP checkpoint's path there once lacked its s3://); no merged part is
left at the URI. `make test` runs the DDP study on GCS (Ray Train's own checkpoints in a GCS bucket);
RAY_CIFAR_LONG_TESTS=1 runs all four.
Every process killed here is one this test started (the driver) or a descendant of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shlex
import shutil
import subprocess
import sys
import uuid
from datetime import timedelta

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import TINY_MODEL, long_test, synthetic_cifar, write_parquet_folder
from ray_cifar import console, storage
from ray_cifar.cli import local_output
from ray_cifar.results import ResultsLog
from test_fault_tolerance import kill_driver_when, study_args

pytestmark = pytest.mark.integration

EPOCHS = 6
SETS = TINY_MODEL + ["data.pipeline=torch", "train.amp=fp32", "train.torch_threads=1", f"train.epochs={EPOCHS}",
                     "train.global_batch_size=50", "data.val_size=100", "schedule.name=constant",
                     "tune.scheduler=fifo", "tune.max_concurrent_trials=1",
                     "tune.search_space={optim.lr: {grid: [0.05, 0.1]}}", "tune.dashboard=false"]
COMPARED = ("train_loss", "train_acc", "val_loss", "val_acc")
# The DDP study on GCS (two minutes): Ray Train's own checkpoints in a bucket, and the retried job's command line.
# A one-rank trial's checkpoints (ray_cifar's store) in both kinds of bucket are checked without a study below.
IN_EVERY_RUN = {("gs", 2)}


@contextlib.contextmanager
def _s3_server():
    """moto's S3 server, in this process; (AWS_* variables that point pyarrow at it, a function making a bucket)."""
    moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
    try:
        yield env, fs.create_dir
    finally:
        server.stop()


@contextlib.contextmanager
def _gcs_server(tmp_path):
    """gcp-storage-emulator's GCS server (the JSON API), in this process. pyarrow's GCS client goes there when
    CLOUD_STORAGE_EMULATOR_ENDPOINT says so; it still wants credentials, and a service account's are signed where
    they are used (no token server): a throwaway key does."""
    emulator = pytest.importorskip("gcp_storage_emulator.server", reason="needs gcp-storage-emulator (the test extra)")
    rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    from cryptography.hazmat.primitives import serialization

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    credentials = tmp_path / "service-account.json"
    credentials.write_text(json.dumps({
        "type": "service_account", "project_id": "test", "private_key_id": "test", "private_key": key,
        "client_email": "test@test.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "http://127.0.0.1:9/token"}))  # never asked: a port nothing listens on
    server = emulator.create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    endpoint = f"http://127.0.0.1:{server._api._httpd.server_port}"
    env = {"CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint, "GOOGLE_APPLICATION_CREDENTIALS": str(credentials)}
    fs = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=endpoint.removeprefix("http://"),
                            project_id="test", retry_time_limit=timedelta(seconds=10))
    try:
        yield env, fs.create_dir
    finally:
        server.stop()


@pytest.fixture(params=["s3", "gs"])
def bucket(request, tmp_path, monkeypatch):
    """(variables that point pyarrow, here and in the study, at a bucket server on loopback; the URI of a new bucket
    there). moto keeps its buckets per process, not per server: each test gets a bucket of its own."""
    server = _s3_server() if request.param == "s3" else _gcs_server(tmp_path)
    with server as (env, make_bucket):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        name = f"study-{uuid.uuid4().hex[:12]}"
        make_bucket(name)
        yield env, f"{request.param}://{name}"


def part_files(fs: pafs.FileSystem, path: str) -> list[str]:
    selector = pafs.FileSelector(f"{path}/results.parts", allow_not_found=True)
    return sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)


def keys(rows) -> set[tuple[str, int]]:
    return {(r["trial_id"], r["epoch"]) for r in rows}


def rows_at(uri: str) -> dict[tuple[str, int], dict]:
    """The rows at a study URI (results.parquet and the parts not merged yet), by (trial, epoch)."""
    fs, path = storage.filesystem(uri)
    rows = {}
    for f in [f"{path}/results.parquet", *part_files(fs, path)]:
        try:
            rows.update({(r["trial_id"], r["epoch"]): r for r in pq.read_table(f, filesystem=fs).to_pylist()})
        except (OSError, FileNotFoundError):  # not there (yet), or merged away while listed
            continue
    return rows


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_study_in_a_bucket_survives_its_head_and_disk(bucket, tmp_path, ranks, monkeypatch):
    variables, root = bucket
    if (root.split(":")[0], ranks) not in IN_EVERY_RUN:
        long_test(f"{root.split(':')[0]} with {ranks} rank(s), as gs with 2")
    data = write_parquet_folder(str(tmp_path / "data"), synthetic_cifar(1000, 100))
    for name in storage.DATA_FILES:
        storage.upload(os.path.join(data, name), f"{root}/cifar10", name)
    output = f"{root}/study"
    cache = tmp_path / "head-cache"  # the head's disk: the data copy and the local copy of the output
    env = {**os.environ, **variables, "RAY_CIFAR_CACHE": str(cache)}
    local = local_output(output, str(cache))

    sets = SETS + ([f"train.num_workers={ranks}", "train.cpus_per_worker=0.5", "tune.trial_driver_cpus=0.5",
                    "tune.dashboard=true"] if ranks > 1 else [])  # DDP trials need Ray's dashboard
    args = study_args(f"{root}/cifar10", output, *sets)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
    # Killed once the second trial's first row is at the URI (the first trial has finished).
    kill_driver_when(proc, lambda: len({t for t, _ in rows_at(output)}) == 2, "the second trial's first row at the URI",
                     timeout=600)
    recorded_here = {(r["trial_id"], r["epoch"]): r for r in ResultsLog(local).read()}  # frozen: the driver is dead
    at_kill = rows_at(output)
    first, second = sorted({t for t, _ in at_kill})
    assert {e for t, e in at_kill if t == first} == set(range(1, EPOCHS + 1))
    assert len(recorded_here) < 2 * EPOCHS, "the study ended before its second trial's rows were at the URI"
    # Rows reach the bucket as recorded: none of the head's is missing there, but for one whose copy the kill cut.
    assert len(set(recorded_here) - set(at_kill)) <= 1, sorted(set(recorded_here) - set(at_kill))

    # The disk goes with the head; and, in the bucket, the finished trial's rows of epochs 3-6 (as if their copy
    # had been cut): only Tune's state and the trial's checkpoints at the URI know them.
    fs, path = storage.filesystem(output)
    dropped = {(first, e) for e in range(3, EPOCHS + 1)}
    for part in part_files(fs, path):
        if keys(pq.read_table(part, filesystem=fs).to_pylist()) & dropped:
            fs.delete_file(part)
    assert not dropped & set(rows_at(output))
    shutil.rmtree(cache)

    # The DDP study comes back as a retried KubeRay RayJob does: its first command line, --resume-if-exists.
    again = args + ["--resume-if-exists"] if ranks > 1 else [sys.executable, "-m", "ray_cifar.tune", "--resume", output]
    resumed = subprocess.run(again, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert f"trial {first} finished with epochs 3-{EPOCHS} unrecorded: recovered" in resumed.stdout

    final = rows_at(output)
    assert set(final) == {(t, e) for t in (first, second) for e in range(1, EPOCHS + 1)}
    for key, row in at_kill.items():
        if key in dropped:  # recovered: the same epoch's figures, from the checkpoint's history / Tune's last result
            assert all(final[key][m] == pytest.approx(row[m], abs=1e-9) for m in COMPARED), key
        else:  # kept as written before the kill
            assert final[key]["time"] == row["time"], key
    resumed_rows = [r for k, r in final.items() if k[0] == second and k not in at_kill]
    # From its checkpoint in the bucket: the first epoch the new driver trained says where it resumed from.
    assert resumed_rows and max(r["resumed_from_epoch"] or 0 for r in resumed_rows) >= 1, resumed_rows
    trials = pq.read_table(f"{path}/trials.parquet", filesystem=fs).to_pylist()
    assert {(t["trial_id"], t["status"], t["epochs"]) for t in trials} == {(first, "completed", EPOCHS),
                                                                          (second, "completed", EPOCHS)}
    assert all(t["best_checkpoint"].startswith(f"{output}/ray/trial-") for t in trials)
    assert [t["test_acc"] is not None for t in sorted(trials, key=lambda t: -t["best_val_acc"])] == [True, False]
    assert not part_files(fs, path), "parts merged into results.parquet are still at the URI"
    # The lost head's console log came back with the study's files, and the new session's went up beside it.
    logs = sorted(i.path for i in storage.children(fs, f"{path}/{console.LOGS}") if i.type == pafs.FileType.File)
    assert len(logs) == 2, logs
    with fs.open_input_stream(logs[0]) as f:
        assert f.read().decode().splitlines()[0].endswith("python -m ray_cifar.tune " + shlex.join(args[3:]))
    with fs.open_input_stream(logs[1]) as f:
        resumed_log = f.read().decode()
    assert "best trial" in resumed_log
    if ranks > 1:  # printed before the study's folder came back from the bucket: held, then the log's first line
        assert resumed_log.splitlines()[1] == f"[ray_cifar] --resume-if-exists: {output} holds a study: continuing " \
                                              "it (its own config.yaml)"

    # Its report, straight from the bucket (into ./NAME-report by default).
    from ray_cifar import report

    monkeypatch.chdir(tmp_path)
    assert report.main([output]) == 0
    assert first in (tmp_path / "study-report" / "report.md").read_text()


def test_an_old_pbt_generation_in_a_bucket_keeps_its_best_checkpoint_alone(bucket):
    """What PBT's driver does to a member's earlier generation (ray_cifar.tuning.pbt), with objects, not folders."""
    from ray_cifar.checkpoint_store import keep_only

    _, root = bucket
    fs, in_bucket = storage.filesystem(root)
    run = f"{in_bucket}/study/ray/trial-a-g1"
    for name in ("checkpoint_000001/state.pt", "checkpoint_000002/state.pt", "checkpoint_000002/state.pt.sha256",
                 "checkpoint_manager_snapshot.json"):
        with fs.open_output_stream(f"{run}/{name}") as f:
            f.write(b"x")

    def objects() -> list[str]:
        found = fs.get_file_info(pafs.FileSelector(f"{in_bucket}/study", recursive=True, allow_not_found=True))
        return sorted(i.path.removeprefix(f"{run}/") for i in found if i.type == pafs.FileType.File)

    keep_only(storage.location_in(fs, run), "checkpoint_000002")
    assert objects() == ["checkpoint_000002/state.pt", "checkpoint_000002/state.pt.sha256"]
    keep_only(storage.location_in(fs, run), None)
    assert objects() == []
    keep_only(storage.location_in(fs, run), None)  # gone already: not an error


def test_merged_parts_leave_the_bucket_only_after_the_merged_file_is_there(bucket, tmp_path):
    """The driver merges results parts as the study runs (every 256; here 3): the bucket holds every recorded row at
    each moment, and its merged parts are deleted."""
    from ray_cifar.tuning.recorder import StudyRecorder

    _, root = bucket
    uri = f"{root}/study"
    fs, path = storage.filesystem(uri)

    class Trial:
        def __init__(self, trial_id):
            self.trial_id, self.config = trial_id, {"optim.lr": 0.1}

    rec = StudyRecorder(str(tmp_path / "study"), lambda c: {"optim.lr": c["optim.lr"]}, "val_acc", "max",
                        tensorboard=False, mirror_to=uri, compact_every=3)
    recorded = set()
    for epoch in range(1, 5):
        for tid in ("a", "b"):
            rec.on_trial_result(0, [], Trial(tid), {"epoch": epoch, "epochs": 4, "val_acc": epoch / 10})
            recorded.add((tid, epoch))
            assert set(rows_at(uri)) == recorded
            assert len(part_files(fs, path)) < 3
    assert fs.get_file_info(f"{path}/results.parquet").type == pafs.FileType.File


def test_a_trials_checkpoints_in_a_bucket_with_and_without_folder_markers(bucket, tmp_path):
    """A one-rank trial's store in a bucket: the latest, the one before and the best kept, the newest that loads
    found, folders deleted. A folder there may have a marker object (pyarrow's create_dir makes one, as Ray Train's
    uploads do) or none (a file uploaded alone, as ray_cifar's rows are): pyarrow lists the latter on S3 but not on
    GCS, where a checkpoint folder without one was invisible and could not be deleted."""
    import torch

    from ray_cifar import checkpoint, checkpoint_store

    _, root = bucket
    location = f"{root}/study/ray/trial-x"
    fs, path = storage.filesystem(location)
    store = checkpoint_store.CheckpointStore(location)
    assert store.latest() is None and not checkpoint_store.has_checkpoint(location)

    def made(epoch: int, best: int) -> str:
        folder = str(tmp_path / f"made-{epoch}")
        checkpoint.save_state({"epoch": epoch, "best": {"epoch": best}, "weights": torch.full((2,), float(epoch))},
                              folder)
        return folder

    def kept() -> list[str]:
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return sorted({posixpath.relpath(i.path, path).split("/")[0] for i in found})

    for epoch, best in {1: 1, 2: 1, 3: 3, 4: 3}.items():
        store.save(made(epoch, best), epoch, best)
    assert kept() == ["checkpoint_000003", "checkpoint_000004"]
    # Epoch 5 uploaded file by file: no folder marker.
    folder = made(5, 3)
    for name in os.listdir(folder):
        storage.upload(os.path.join(folder, name), location, f"checkpoint_000005/{name}")
    assert checkpoint_store.has_checkpoint(location)
    latest = store.latest()
    assert latest["epoch"] == 5 and torch.equal(latest["weights"], torch.full((2,), 5.0))
    store.save(made(6, 3), 6, 3)
    store.save(made(7, 3), 7, 3)  # drops epoch 5, the folder without a marker
    assert kept() == ["checkpoint_000003", "checkpoint_000006", "checkpoint_000007"]
    checkpoint_store.keep_only(location, "checkpoint_000007")
    assert kept() == ["checkpoint_000007"]
    checkpoint_store.keep_only(location, None)
    assert kept() == [] and storage.is_empty(location)

    # An --output holding only rows uploaded file by file is not empty.
    storage.upload(os.path.join(folder, checkpoint.STATE_FILE), f"{root}/out", "results.parts/p.parquet")
    assert not storage.is_empty(f"{root}/out")
