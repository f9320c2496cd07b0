"""A study whose data and --output are s3:// URIs, on a real S3 server on loopback (moto's, in this process), and
the head lost with its disk: the driver SIGKILLed, its local copy of the output deleted, the study resumed from the
URI alone: `--resume s3://...`, or (the DDP study) the first command line with `--resume-if-exists`, as a retried
KubeRay RayJob does on a new head.

Two 6-epoch trials, one after the other, of one rank (trained in the Tune trial process, checkpoints by
ray_cifar's store) and of two (DDP, a TorchTrainer, checkpoints by Ray Train); the driver dies while the second
trains. Checked: every row recorded before the kill was already at the URI (each results part is copied up as
written, not a minute later); after the kill the finished trial's last rows are also deleted from the bucket, and
the resumed study brings them back from Tune's last result and the trial's checkpoint, equal to the originals; the
second trial resumes from its checkpoint; every epoch of both trials is recorded once; the best trial is evaluated
on test from its checkpoint in the bucket (a DDP checkpoint's path there once lacked its s3://); no merged part is
left at the URI.
Every process killed here is one this test started (the driver) or a descendant of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import TINY_MODEL, synthetic_cifar, write_parquet_folder
from ray_cifar import storage
from ray_cifar.cli import local_output
from ray_cifar.results import ResultsLog
from test_fault_tolerance import kill_driver_when, study_args

pytestmark = pytest.mark.integration

EPOCHS = 6
SETS = TINY_MODEL + ["data.pipeline=torch", "train.amp=fp32", "train.torch_threads=1", f"train.epochs={EPOCHS}",
                     "train.global_batch_size=50", "data.val_size=100", "schedule.name=constant",
                     "tune.scheduler=fifo", "tune.max_concurrent_trials=1",
                     "tune.search_space={optim.lr: {grid: [0.05, 0.1]}}"]
COMPARED = ("train_loss", "train_acc", "val_loss", "val_acc")


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """(AWS_* variables that point pyarrow, here and in the study, at an S3 endpoint; a new bucket there). moto keeps
    its buckets per process, not per server: each test gets a bucket of its own."""
    moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bucket = f"study-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(bucket)
    yield env, bucket
    server.stop()


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
def test_a_study_on_s3_survives_its_head_and_disk(s3, tmp_path, ranks, monkeypatch):
    s3, bucket = s3
    data = write_parquet_folder(str(tmp_path / "data"), synthetic_cifar(1000, 100))
    for name in storage.DATA_FILES:
        storage.upload(os.path.join(data, name), f"s3://{bucket}/cifar10", name)
    output = f"s3://{bucket}/study"
    cache = tmp_path / "head-cache"  # the head's disk: the data copy and the local copy of the output
    env = {**os.environ, **s3, "RAY_CIFAR_CACHE": str(cache)}
    local = local_output(output, str(cache))

    sets = SETS + ([f"train.num_workers={ranks}", "train.cpus_per_worker=0.5", "tune.trial_driver_cpus=0.5"]
                   if ranks > 1 else [])
    args = study_args(f"s3://{bucket}/cifar10", output, *sets)
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
    assert all(t["best_checkpoint"].startswith(f"s3://{bucket}/study/ray/trial-") for t in trials)
    assert [t["test_acc"] is not None for t in sorted(trials, key=lambda t: -t["best_val_acc"])] == [True, False]
    assert not part_files(fs, path), "parts merged into results.parquet are still at the URI"

    # Its report, straight from the bucket (into ./NAME-report by default).
    from ray_cifar import report

    monkeypatch.chdir(tmp_path)
    assert report.main([output]) == 0
    assert first in (tmp_path / "study-report" / "report.md").read_text()


def test_an_old_pbt_generation_in_a_bucket_keeps_its_best_checkpoint_alone(s3):
    """What PBT's driver does to a member's earlier generation (ray_cifar.tuning.pbt), with objects, not folders."""
    from ray_cifar.checkpoint_store import keep_only

    _, bucket = s3
    fs, _ = storage.filesystem(f"s3://{bucket}")
    run = f"{bucket}/study/ray/trial-a-g1"
    for name in ("checkpoint_000001/state.pt", "checkpoint_000002/state.pt", "checkpoint_000002/state.pt.sha256",
                 "checkpoint_manager_snapshot.json"):
        with fs.open_output_stream(f"{run}/{name}") as f:
            f.write(b"x")

    def objects() -> list[str]:
        found = fs.get_file_info(pafs.FileSelector(f"{bucket}/study", recursive=True, allow_not_found=True))
        return sorted(i.path.removeprefix(f"{run}/") for i in found if i.type == pafs.FileType.File)

    keep_only(f"s3://{run}", "checkpoint_000002")
    assert objects() == ["checkpoint_000002/state.pt", "checkpoint_000002/state.pt.sha256"]
    keep_only(f"s3://{run}", None)
    assert objects() == []
    keep_only(f"s3://{run}", None)  # gone already: not an error


def test_merged_parts_leave_the_bucket_only_after_the_merged_file_is_there(s3, tmp_path):
    """The driver merges results parts as the study runs (every 256; here 3): the bucket holds every recorded row at
    each moment, and its merged parts are deleted."""
    from ray_cifar.tuning.recorder import StudyRecorder

    _, bucket = s3
    uri = f"s3://{bucket}/study"
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
