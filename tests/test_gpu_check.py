"""The GPU check (benchmarks/gpu_check.py, `make gpu-check`) dry-run on CPU through the same code as on a GPU:
core with Ray and DALI unimportable (as on the GPU machine), ray on a local Ray, dali on DALI's CPU pipeline;
then each stage stopped by a tiny cap, cleanly, with its JSON written. Real processes, real Ray, real DALI.
Data: the first rows of $RAY_CIFAR_DATA's Parquet files when it is set (real images, a few seconds to decode
rather than a minute), else the synthetic Parquet folder."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from processes import descendants, end_tree

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_figures  # noqa: E402  (the README's figures from the stages' JSON)
import gpu_check  # noqa: E402  (its functions, in-process, where a test needs no stage run)

# A sitecustomize that makes Ray and DALI unimportable in every process that starts with it on its
# PYTHONPATH (the stage and all its children), as on the GPU machine; it logs that it loaded and every
# import it refused, so the test knows it was in force.
BLOCKER = '''
import os
import sys

_LOG = os.environ.get("GPU_CHECK_BLOCK_LOG")


def _note(line):
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(line + "\\n")


class _Unimportable:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in ("ray", "nvidia.dali")):
            _note(f"refused {name} in {os.getpid()}")
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine)", name=name)
        return None


sys.meta_path.insert(0, _Unimportable())
_note(f"loaded in {os.getpid()}")
'''


@pytest.fixture(scope="module")
def data_dir(synthetic_parquet_dir, tmp_path_factory) -> str:
    real = os.environ.get("RAY_CIFAR_DATA")
    if not real:
        return synthetic_parquet_dir
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("cifar_head")
    for split, rows in (("train", 1000), ("test", 200)):
        pq.write_table(pq.read_table(os.path.join(real, f"{split}.parquet")).slice(0, rows), folder / f"{split}.parquet")
    return str(folder)


def run_check(stage: str, results, data: str, *extra: str, env: dict | None = None, timeout: float = 780):
    """Run one stage as `make gpu-check` does; returns (exit status, output, its JSON, seconds). Every process of
    its tree seen while it ran must be gone when it returns. TIMEOUT is above the longest dry-run stage cap (ray:
    240 s x 3) and under pytest's per-test timeout: a stage that overruns its own cap fails here."""
    argv = [sys.executable, CHECK, stage, "--dry-run", "--results", str(results), "--data", data, *extra]
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    seen: set[int] = set()
    try:
        while proc.poll() is None and time.monotonic() - start < timeout:
            seen.update(descendants(proc.pid))
            time.sleep(0.2)
        seconds = time.monotonic() - start  # the stage's own exit (its output may close later)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            end_tree(descendants(proc.pid) + [proc.pid])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in seen):
        time.sleep(0.2)
    left = [p for p in seen if os.path.exists(f"/proc/{p}") and not _zombie(p)]
    end_tree(left)
    assert not left, f"processes of the stage outlived it: {left}\n{out[-3000:]}"
    with open(os.path.join(results, f"gpu_{stage}.json")) as f:
        doc = json.load(f)
    return proc.returncode, out, doc, seconds


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def parts(doc: dict) -> dict:
    return {p["name"]: p for p in doc["parts"]}


def assert_complete(rc: int, out: str, doc: dict, stage: str) -> dict:
    assert rc == 0, out[-4000:]
    assert doc["stage"] == stage and doc["dry_run"] is True and doc["status"] == "ok"
    assert doc["device_type"] == "cpu" and doc["torch"] == torch.__version__ and "device" in doc
    assert doc["shm_free_gib"] > 0  # where the DataLoader workers' batches go: a small one fails them on the GPU
    assert all(p["status"] == "ok" for p in doc["parts"]), [(p["name"], p["status"], p.get("error")) for p in doc["parts"]]
    assert all(p["estimate_seconds"] <= p["cap_seconds"] for p in doc["parts"])
    assert out.rstrip().splitlines()[-1] == doc["summary"]  # the one-line summary comes last
    # No warning among the stage's lines (a lend's output is read for what went wrong; one seen: torch's on a tensor
    # made from the data cache's read-only memory map).
    assert not [line for line in out.splitlines() if "Warning" in line], out[-4000:]
    assert doc["summary"].startswith(f"gpu-check {stage} (dry run): {len(doc['parts'])}/{len(doc['parts'])} parts ok")
    return parts(doc)


def blocking_pythonpath(tmp_path) -> str:
    """A PYTHONPATH whose first folder holds BLOCKER as sitecustomize: Ray and DALI unimportable under it."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    return os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def running_part(tmp_path, stage: str, dry_run: bool) -> "gpu_check.Check":
    """A stage's Check of no parts, as if one of its parts had just started: two minutes left in the stage, from
    now (gpu_check's clock starts at its import)."""
    args = argparse.Namespace(dry_run=dry_run, cap=time.monotonic() - gpu_check.STARTED + 120,
                              results=str(tmp_path), work=str(tmp_path / "work"), keep_work=False, parts=None,
                              data=None)
    check = gpu_check.Check(stage, [], args, torch.device("cpu"))
    check.current, check.part_started = {}, time.monotonic()
    return check


def test_core_dry_run_needs_neither_ray_nor_dali(tmp_path, data_dir):
    log = tmp_path / "blocked.log"
    env = {"PYTHONPATH": blocking_pythonpath(tmp_path), "GPU_CHECK_BLOCK_LOG": str(log)}
    rc, out, doc, _ = run_check("core", tmp_path / "results", data_dir, env=env)
    lines = log.read_text().splitlines()
    # In force in the stage, its three training runs and pytest: a hard import of either would have failed a part.
    assert sum(line.startswith("loaded in") for line in lines) >= 5, lines
    got = assert_complete(rc, out, doc, "core")
    assert list(got) == ["train_step", "cuda_tests", "seed000", "augment"]  # by value, the short checks first

    step = got["train_step"]["figures"]
    variants = {v["variant"]: v for v in step["variants"]}
    assert set(variants) == {"plain-pytorch-fp32", "ray_cifar-fp32-nchw", "ray_cifar-bf16-channels_last",
                             "ray_cifar-bf16-channels_last-compile"}
    assert all(v["images_per_second"] > 0 and 0 < v["mfu_of_measured_peak"] for v in variants.values())
    assert step["measured_bf16_matmul_tflops"] > 0 and step["failed_variants"] == step["cut_variants"] == {}
    assert step["ratios"]["bf16_channels_last_compile / plain_pytorch"] == pytest.approx(
        variants["ray_cifar-bf16-channels_last-compile"]["images_per_second"]
        / variants["plain-pytorch-fp32"]["images_per_second"], rel=1e-2)

    runs = got["seed000"]["figures"]["runs"]
    assert [(r["lr"], r["published_test_acc"]) for r in runs] == [(0.1, 83.73), (0.01, 87.54), (0.001, 82.91)]
    assert all(r["epochs_done"] == 2 and 0 <= r["test_acc"] <= 100 and r["wall_seconds"] > 0 for r in runs)
    assert "seed000 test_acc" in doc["summary"]

    tests = got["cuda_tests"]["figures"]
    assert tests["exit_status"] == 0 and tests["tests"] >= 5 and tests["skipped"] == tests["tests"]  # no CUDA here
    assert "torch-batch / torchvision-dataloader" in " ".join(got["augment"]["figures"]["ratios"])
    assert not any(r["path"].startswith("dali") for r in got["augment"]["figures"]["results"])

    # The README's figures from this JSON: marked a dry run, a line a part, the seed table beside the published.
    page = gpu_figures.render(str(tmp_path / "results")).splitlines()
    assert page[0] == f"### core: {doc['device']}" and any(line.startswith("**DRY RUN") for line in page)
    assert [line.split(" | ")[:2] for line in page if line.startswith("| ") and " | ok | " in line] == [
        ["| train_step", "ok"], ["| cuda_tests", "ok"], ["| seed000", "ok"], ["| augment", "ok"]]
    text = "\n".join(page)
    for r in runs:
        assert f"| {r['lr']} | {r['test_acc']:.2f} | {r['published_test_acc']} | {r['vs_published']:.2f} |" in text
    assert f"| plain-pytorch-fp32 | {variants['plain-pytorch-fp32']['images_per_second']:,.0f} | 1.00x |" in page[
        page.index("| variant | img/s | vs plain PyTorch | MFU | MFU (datasheet) | warm-up s |") + 2]
    assert "### ray: not run (no gpu_ray.json)" in page and "### dali: not run (no gpu_dali.json)" in page

    # A lend cut short is written up as it is: the seed runs so far, the part's status, no invented figure.
    doc["parts"][0]["figures"]["cut_variants"] = {"ray_cifar-bf16-channels_last-compile": "warm-up stopped at its "
                                                                                           "deadline after 115.0 s"}
    doc["parts"][2].update(status="cut: the stage cap after 200 s", summary=None)
    doc["parts"][2]["figures"]["runs"] = runs[:1]
    doc["parts"][3].update(status="cut: stage cap reached before it started", figures=None, summary=None)
    del doc["parts"][3]["seconds"]
    doc["parts"][0]["figures"]["variants"][-1].update(mfu_of_measured_peak=0.412, mfu=0.3315)  # what CUDA adds
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "gpu_core.json").write_text(json.dumps({**doc, "status": "cut", "dry_run": False, "driver": "580.1",
                                                       "compute_mode": "Default"}))
    page = gpu_figures.render(str(partial))
    assert " | 41.2% | 33.1% | " in page and ", driver 580.1, compute mode Default. Stage cut: " in page
    assert "**DRY RUN" not in page and "| seed000 | cut: the stage cap after 200 s |" in page
    assert "| 0.1 | " in page and "| 0.01 | " not in page and "torchvision-dataloader" not in page
    assert "| augment | cut: stage cap reached before it started | - (20) |" in page
    assert ("Not measured: ray_cifar-bf16-channels_last-compile: warm-up stopped at its deadline after 115.0 s"
            in page)


def test_ray_dry_run(tmp_path, data_dir):
    pytest.importorskip("ray")
    rc, out, doc, _ = run_check("ray", tmp_path / "results", data_dir)
    got = assert_complete(rc, out, doc, "ray")
    asha = got["asha"]["figures"]
    assert asha["trials"] == 2 and asha["exit_status"] == 0 and 3 <= asha["trial_epochs"] <= 4  # two in a dry run
    assert asha["best_trial_test_acc"] is not None and asha["study_images_per_second"] > 0
    packed = got["packed"]["figures"]
    assert packed["trials"] == 2 and packed["packing_speedup"] > 0 and packed["wall_ratio"] > 0
    kill = got["kill_resume"]["figures"]
    assert kill["trial_status"] == "completed" and kill["epochs"] == list(range(1, 7))
    assert kill["killed_after_epoch"] >= 1 and kill["resumed_from_epoch"] >= 1
    page = gpu_figures.render(str(tmp_path / "results"))
    assert "| packed | 2 | 2 | " in page and f"{packed['packing_speedup']}x the study img/s" in page
    assert f"SIGKILL after epoch {kill['killed_after_epoch']}, resumed from epoch {kill['resumed_from_epoch']}" in page


def test_dali_dry_run_writes_the_measurement_auto_reads(tmp_path, data_dir, monkeypatch):
    pytest.importorskip("nvidia.dali")
    from ray_cifar.data import pipelines

    committed = os.path.join(pipelines.BENCHMARK_RESULTS, "data_pipeline_cpu.json")
    before = hashlib.sha256(open(committed, "rb").read()).hexdigest()
    results = tmp_path / "results"
    rc, out, doc, _ = run_check("dali", results, data_dir)
    got = assert_complete(rc, out, doc, "dali")
    assert got["dali_tests"]["figures"]["exit_status"] == 0 and got["dali_tests"]["figures"]["tests"] >= 1
    rows = got["loaders"]["figures"]["results"]
    assert {r["path"] for r in rows} == {"torchvision-dataloader", "torch-batch", "dali-cpu"}
    page = gpu_figures.render(str(results))
    assert "| set | torchvision-dataloader | dali-cpu | torch-batch |" in page and "FAILED" not in page
    assert all(f"- {k}: {v}x" in page for k, v in got["loaders"]["figures"]["ratios"].items())
    assert all(r["build_seconds"] >= 0 and r["images_per_second"] > 0 for r in rows)
    fed = {r["path"] for r in got["fed_epoch"]["figures"]["results"]}
    assert {"resnet18-from-gpu-memory", "resnet18-fed-by-dali-cpu", "resnet18-fed-by-torch-batch"} <= fed
    # A dry run leaves the package's committed measurement alone; its own file is the one auto reads.
    assert hashlib.sha256(open(committed, "rb").read()).hexdigest() == before
    assert got["loaders"]["figures"]["measurement_file"] == str(results / "data_pipeline_cpu.json")
    monkeypatch.setattr(pipelines, "BENCHMARK_RESULTS", str(results))
    monkeypatch.setattr(pipelines, "dali_available", lambda: True)
    from ray_cifar.validation import load_config

    logs = []
    cfg = load_config(None, ["data.crop_padding=4", "data.flip_p=0.5"]).data
    choice = pipelines.resolve_pipeline(cfg, torch.device("cpu"), logs.append)
    by = {r["path"]: r["images_per_second"] for r in rows if r["set"] == "crop+flip"}
    assert choice == ("dali" if by["dali-cpu"] >= by["torch-batch"] else "torch")
    assert "data_pipeline_cpu.json" in logs[-1]


@pytest.mark.parametrize("stage, cap, how", [
    ("core", 6, "the watchdog ends an in-process part"),
    ("ray", 10, "a Ray study's process tree is stopped"),
    ("dali", 6, "a pytest subprocess is stopped"),
])
def test_a_tiny_cap_stops_the_stage_cleanly_with_its_json(tmp_path, data_dir, stage, cap, how):
    if stage == "ray":
        pytest.importorskip("ray")
    if stage == "dali":
        pytest.importorskip("nvidia.dali")
    rc, out, doc, seconds = run_check(stage, tmp_path / "results", data_dir, "--cap", str(cap))
    assert rc == 3, out[-3000:]
    assert seconds <= cap + 4, f"{how}: the stage took {seconds:.1f} s under a {cap} s cap"
    statuses = [p["status"] for p in doc["parts"]]
    assert doc["status"] == "cut", statuses
    # The part running at the cap is cut (which one depends on the machine's speed); those before it ran to
    # their end, none after it did. (One cut by a deadline of its own before the stage's, as train_step's warm-up,
    # leaves the next part time to start, and that one is cut by the stage cap.)
    cut_at = next(i for i, s in enumerate(statuses) if s.startswith("cut"))
    assert all(s == "ok" for s in statuses[:cut_at]), statuses
    assert all(s == "not run" or s.startswith("cut") for s in statuses[cut_at + 1:]), statuses
    assert any("stage cap" in s for s in statuses[cut_at:]), statuses
    assert doc["dry_run"] is True and doc["cap_seconds"] == cap and doc["seconds"] <= cap + 1
    assert out.rstrip().splitlines()[-1] == doc["summary"] and "cut by the cap" in doc["summary"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: its GPU tests would run, not skip")
def test_on_the_gpu_a_skipped_gpu_test_fails_its_part(tmp_path):
    # pytest exits 0 when every test skips: on the GPU that would read "ok" having proved nothing (the tests skip
    # where CUDA is not seen). A check on the GPU (here: not a dry run) runs the real files; none can run here.
    check = running_part(tmp_path, "core", dry_run=False)
    with pytest.raises(RuntimeError, match=r"^(\d+) of \1 skipped on the GPU: test_.* \(needs a CUDA GPU\)"):
        gpu_check.pytest_part(check, gpu_check.CORE_GPU_TESTS, "cuda_tests")
    assert check.figures["exit_status"] == 0 and check.figures["tests"] == check.figures["skipped"] >= 5
    assert len(check.figures["skips"]) == check.figures["skipped"]

    check.dry_run = True  # a dry run's skips are expected
    gpu_check.pytest_part(check, gpu_check.CORE_GPU_TESTS, "cuda_tests")
    assert check.current["summary"].startswith("cuda_tests: 0 passed, 0 failed, ")


def test_a_test_file_skipped_whole_is_named_with_its_reason(tmp_path):
    # DALI unimportable in the dali stage's pytest: test_dali.py's importorskip skips the module whole. pytest
    # exits 5 (no test ran), and JUnit says "collection skipped", the reason only in its text.
    test_file = tmp_path / "test_needs_it.py"
    test_file.write_text("import pytest\npytest.importorskip('no_such_module_here', reason='no_such_module_here is "
                         "not installed')\n@pytest.mark.gpu\ndef test_it():\n    pass\n")
    check = running_part(tmp_path, "dali", dry_run=True)
    with pytest.raises(RuntimeError) as failed:
        gpu_check.pytest_part(check, [str(test_file)], "needs_it")
    assert str(failed.value) == "pytest exit 5: skipped test_needs_it (no_such_module_here is not installed)"


def test_a_pytest_part_cut_by_its_cap_keeps_the_outcomes_printed_so_far(tmp_path):
    # pytest writes its JUnit XML only at its end: a cap that stops it (a cold compile slower than planned) left
    # no outcome at all. The part keeps what `pytest -v` printed, a line a test.
    test_file = tmp_path / "test_gpu_things.py"
    test_file.write_text("import time\nimport pytest\n\n@pytest.mark.gpu\ndef test_quick():\n    pass\n\n"
                         "@pytest.mark.gpu\ndef test_skipped():\n    pytest.skip('not here')\n\n"
                         "@pytest.mark.gpu\ndef test_endless():\n    time.sleep(600)\n")
    check = running_part(tmp_path, "core", dry_run=True)
    check.part_deadline = check.part_started + 8  # pytest's start and the first two tests: ~1 s here
    with pytest.raises(gpu_check.CapReached):
        gpu_check.pytest_part(check, [str(test_file)], "gpu_things")
    done = check.figures["outcomes_before_the_cap"]  # (test ids as pytest prints them: from the checkout)
    assert {test.split("::")[-1]: outcome for test, outcome in done.items()} == {"test_quick": "PASSED",
                                                                                "test_skipped": "SKIPPED"}
    assert check.current["summary"].startswith("gpu_things: before the cap, 1 passed, 1 not: ")
    assert check.current["summary"].endswith("test_gpu_things.py::test_skipped SKIPPED")


def test_usage_mistakes_are_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, CHECK, "core", "--data", str(tmp_path), "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("gpu_check: error: torch ")
    assert "DRY_RUN=1" in proc.stderr


def test_a_stage_without_its_packages_names_each_missing_one_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": blocking_pythonpath(tmp_path)}
    proc = subprocess.run([sys.executable, CHECK, "ray_dali", "--dry-run", "--data", str(tmp_path), "--results",
                           str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("gpu_check: error: stage ray_dali needs Ray (ray) and NVIDIA DALI (nvidia.dali) "
                                  "importable"), proc.stderr


def test_ray_dali_dry_run_feeds_a_ray_trial_by_dali_beside_the_torch_path(tmp_path, data_dir):
    pytest.importorskip("ray")
    pytest.importorskip("nvidia.dali")
    rc, out, doc, _ = run_check("ray_dali", tmp_path / "results", data_dir)
    got = assert_complete(rc, out, doc, "ray_dali")
    f = got["dali_study"]["figures"]
    assert f["exit_status"] == 0 and f["trial_statuses"] == {"completed": 2} and f["best_trial_test_acc"] is not None
    pipelines = f["pipelines"]
    assert {k: (v["fed_by"], v["epochs"]) for k, v in pipelines.items()} == {"torch": ("torch", 2),
                                                                             "dali": ("dali-cpu", 2)}
    assert f["dali_vs_torch_epoch_images_per_second"] == pytest.approx(
        pipelines["dali"]["last_epoch_images_per_second"] / pipelines["torch"]["last_epoch_images_per_second"],
        rel=1e-2)
    page = gpu_figures.render(str(tmp_path / "results"))
    assert "| dali | dali-cpu | 2 | " in page and "### core: not run (no gpu_core.json)" in page


def test_make_gpu_check_installs_nothing_and_passes_the_stage_on():
    """The GPU machine has no network: the target must not depend on `install`; PY on the command line wins."""
    # --no-print-directory: under `make test` this make is a sub-make, which would say which folder it enters.
    proc = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "STAGE=ray", "DRY_RUN=1", "RESULTS=somewhere", "PY=python3.12",
                           "DATA=DIR", "CAP=9"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    command = " ".join(proc.stdout.replace("\\\n", " ").split())
    assert command == "python3.12 benchmarks/gpu_check.py ray --results somewhere --data DIR --dry-run --cap 9"


def test_the_lend_plan_fits_twelve_minutes_and_agrees_with_the_stages():
    """benchmarks/README's lend, call by call (the issue's plan of a lend): its calls add up to its total, at most 12
    minutes with the machine's start; a stage's call is planned no shorter than its parts' estimates and its
    timeout_s leaves the stage its cap; the estimates and caps the README's table and gpu_check.py's docstring give
    are the ones the stages run with (a changed estimate changes the plan, here checked)."""
    with open(os.path.join(ROOT, "benchmarks", "README.md")) as f:
        readme = f.read()
    lend = readme.split("### A lend, call by call", 1)[1].split("\nThe commands", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lend.splitlines()
            if line.startswith("|") and not line.startswith("| ---")][1:]  # (the header row left out)
    at_total = next(i for i, row in enumerate(rows) if row[3].startswith("**"))
    plan, beyond = rows[:at_total], rows[at_total + 1:]  # after the total: the calls only made where time is left
    total = float(re.fullmatch(r"\*\*([\d.]+) min\*\*", rows[at_total][3])[1])
    minutes = [float(re.fullmatch(r"([\d.]+) min", row[3])[1]) for row in plan]
    assert plan[0][0] == "(start)" and minutes[0] >= 1.0  # the machine's start counts
    assert round(sum(minutes), 1) == total <= 12.0, (minutes, total)
    assert all(row[0].endswith("if time is left") for row in beyond), beyond
    stages, planned_stages = gpu_check.STAGES, []
    for row in plan[1:] + beyond:
        stage = re.search(r"\b(core|ray|dali|ray_dali)$", row[2])  # the call that runs a stage names it last
        if stage:
            planned_stages.append(stage[1])
            cap, parts_of_stage = stages[stage[1]]
            assert float(row[3].split()[0]) * 60 >= sum(p.estimate_s for p in parts_of_stage), row
            assert float(row[4]) > cap, row
    assert sorted(planned_stages) == sorted(stages)  # each stage once
    assert [re.search(r"\w+$", row[2])[0] for row in beyond] == ["ray_dali"]  # the one stage beyond the plan

    table = dict((m[1], (float(m[2]), float(m[3])))
                 for m in re.finditer(r"^\| [^|]*\| `(\w+)` \| (\d+) s \((\d+)\) \|", readme, re.MULTILINE))
    docstring = dict((m[1], (float(m[2]), float(m[3])))
                     for m in re.finditer(r"^  (\w+) +~(\d+) s, cap (\d+):", gpu_check.__doc__, re.MULTILINE))
    running = {p.name: (p.estimate_s, p.cap_s) for _, parts_of_stage in stages.values() for p in parts_of_stage}
    assert table == docstring == running
    stage_caps = dict(re.findall(r"^\| (\w+) \((\d+) s\) \|", readme, re.MULTILINE))
    assert {k: float(v) for k, v in stage_caps.items()} == {k: v[0] for k, v in stages.items()}


def test_the_working_tree_leaves_room_for_the_largest_part_a_call_carries():
    """Each call of a lend carries the working tree (tracked files and untracked ones git does not ignore) plus its
    folders, 64 MiB at most. Calls 3-5 carry a DALI part of about 61 MiB, so a results file or data committed by
    mistake would make them fail on the GPU machine, in the middle of a lend: here it fails first."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.decode().strip()}")
    paths = [p for p in listed.stdout.decode().split("\0") if p]
    tree_mib = sum(os.path.getsize(os.path.join(ROOT, p)) for p in paths
                   if os.path.isfile(os.path.join(ROOT, p))) / 2**20
    with open(os.path.join(ROOT, "benchmarks", "README.md")) as f:
        lend = f.read().split("### A lend, call by call", 1)[1].split("\nThe commands", 1)[0]
    carried = [float(mib) for line in lend.splitlines() if line.startswith("| ")
               for mib in re.findall(r"\(([\d.]+) MiB\)", line.split("|")[2])]
    assert max(carried) >= 59, carried  # the DALI parts are in the table
    assert tree_mib < 3.0 and tree_mib + max(carried) < 64.0, (round(tree_mib, 2), max(carried))
