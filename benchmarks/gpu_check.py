"""The GPU check, in three stages that each fit one short lend of a one-GPU machine, and a fourth where a lend has
time left.

    make gpu-check STAGE=core DATA=DIR               # = python benchmarks/gpu_check.py core --data DIR
    make gpu-check STAGE=ray DATA=DIR RESULTS=OUT    # Ray importable; DALI not needed
    make gpu-check STAGE=dali DATA=DIR               # DALI importable; Ray not needed
    make gpu-check STAGE=ray_dali DATA=DIR           # Ray and DALI importable: beyond a lend's plan of 12 minutes
    make gpu-check STAGE=core DRY_RUN=1 RESULTS=DIR  # every part CPU-sized, on a machine without a GPU
    python3 benchmarks/gpu_check.py core --data /root/data --results "$OUT"   # where make is missing

Each stage runs its parts in order of value (the most important figure first), each under its own cap,
the whole stage under a hard wall-clock cap (--cap; the defaults fit an H100/H200 lend). The estimates
below are seconds on one H100/H200, from ResNet-18's FLOPs (0.56 G multiply-adds = 1.1 GFLOP forward,
~3.3 GFLOP a training image) and known ResNet-18 speeds; the cap of each part stands beside it:

core (cap 300 s; torch, torchvision and the GPU machine's own packages only: no Ray, no DALI)
  train_step  ~90 s, cap 130: ResNet-18 training step, plain PyTorch (torchvision DataLoader, fp32) vs
              ray_cifar fp32 NCHW vs bf16 channels_last vs + torch.compile, round-robin in one run; MFU
              against the bf16 matmul rate measured on the device (and the data-sheet peak). A warm-up (the
              compile's) still running 15 s before the cap is stopped: that variant is not measured, the rest are.
  cuda_tests  ~35 s, cap 60: `pytest -m gpu` of the tests that need neither Ray nor DALI (no host sync
              per step, AMP bf16/fp16 + channels_last, compile, the packed rank's memory cap, AutoAugment's ops
              against the CPU's); before seed000, whose length is the least sure, so an overrun there cannot
              starve them
  seed000     ~120 s, cap 200: seed study 000's first table: studies/resnet18_lr_schedule_wd.yaml's
              15-epoch lr sweep (SGD, constant lr 0.1 / 0.01 / 0.001, batch 128), three
              `python -m ray_cifar.train` processes at once on the one GPU; test accuracy beside the
              published 83.73 / 87.54 / 82.91, and wall time
  augment     ~20 s, cap 35: the torch augmentation path on CUDA vs the torchvision DataLoader
ray (cap 240 s; Ray importable, the torch pipeline)
  asha        ~50 s, cap 90: a one-GPU ASHA study of ResNet-18 (4 trials, 2 epochs), one trial at a time
  packed      ~45 s, cap 80: the same study packed four to the GPU (train.gpus_per_worker=0.25)
  kill_resume ~55 s, cap 85: a one-rank GPU trial whose process is SIGKILLed after epoch 1; Tune runs it
              again from its checkpoint and it finishes
dali (cap 180 s; DALI importable, Ray not needed)
  dali_tests  ~20 s, cap 45: `pytest -m gpu tests/test_dali.py`
  loaders     ~26 s, cap 60: DALI GPU vs the torch path vs the torchvision DataLoader on CUDA (images/s,
              build seconds); on a GPU it also writes ray_cifar/measurements/data_pipeline_cuda.json,
              which data.pipeline=auto reads. A loader that fails is recorded with its error, the others
              still measured (here and in fed_epoch), the file still written; the part then fails
  fed_epoch   ~30 s, cap 50: one ResNet-18 epoch fed by each loader, and from GPU memory
ray_dali (cap 120 s; Ray and DALI importable; not in a lend's plan: a sixth call, where the lend has time left)
  dali_study  ~50 s, cap 110: one study, two one-rank ResNet-18 trials one at a time, the same but for
              data.pipeline (dali, then torch): DALI's GPU pipeline in a Ray trial process, what
              data.pipeline=auto picks on a GPU where DALI measured faster, beside the torch path

RESULTS/gpu_<stage>.json is rewritten after every part and every measurement (device, torch / CUDA /
cuDNN versions, every figure and ratio of this run, each part's status, seconds, estimate and cap,
"dry_run"), so a stage stopped by its cap or a crash keeps what it measured; the logs of the
subprocess parts go to RESULTS/gpu_<stage>/. The last line printed is a one-line summary.
A part's cap stops a subprocess part at once and an in-process part between measurements; the stage
cap is hard: a watchdog ends the stage, its child processes included, when it runs out.
Exit status: 0 every part ok, 1 a part failed, 3 the cap cut a part, 2 a usage mistake (one line).
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the stage's clock starts before torch's import, which takes seconds

import argparse  # noqa: E402
import ast  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
import xml.etree.ElementTree as ElementTree  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.append(os.path.join(ROOT, "tests"))  # processes.py: the by-pid process helpers the fault tests use

import torch  # noqa: E402

import data_pipeline as pipeline_bench  # noqa: E402
import train_throughput as step_bench  # noqa: E402
from processes import cmdline, descendants, end_tree  # noqa: E402
from ray_cifar.results import ResultsLog, git_sha  # noqa: E402
from ray_cifar.validation import load_config  # noqa: E402

STUDY = os.path.join("studies", "resnet18_lr_schedule_wd.yaml")
# The tests' tiny ResNet (tests/conftest.py TINY_MODEL): what a dry run trains instead of ResNet-18.
TINY_MODEL = ["model.name=resnet", "model.blocks=[1,1]", "model.widths=[8,16]", "model.stem_width=8"]
# No Ray, no DALI in their imports. test_engine_sync.py last: its last test's cold Inductor compile is the longest,
# and should the part's cap cut it, the others' outcomes are in (the part keeps what pytest -v printed).
CORE_GPU_TESTS = ["tests/test_engine.py", "tests/test_augment.py", "tests/test_engine_sync.py"]
DALI_GPU_TESTS = ["tests/test_dali.py"]
STOP_GRACE_S = 5.0  # a stopped subprocess gets this long after SIGINT before its whole tree is SIGKILLed
# A dry run's caps, the stage's default and every part's, are the GPU's times this many times over: its sizes
# are CPU-sized, but a shared 2-core machine under load (CI runs two test files at once) ran the ray stage's
# parts 3.4x slower than on an idle one, past their GPU caps. --cap still sets the stage's cap exactly.
DRY_RUN_CAP_SCALE = 3.0
# train_step's first round of measurements on the GPU, every variant once: what its warm-ups leave time for before
# the part's cap. 50 steps of 512 at 5-10k img/s in fp32 (the plain baseline, ray_cifar's fp32) take 2.5-5 s a
# variant, bf16 about 1 s.
MEASURE_ROUND_S = 15.0


class CapReached(Exception):
    """A part's own cap, or the stage's, ran out while the part ran."""


@dataclass
class Part:
    name: str
    estimate_s: float  # seconds on one H100/H200 (the module docstring says how each was estimated)
    cap_s: float  # the part's own cap; the stage cap still applies
    run: Callable[["Check"], None]
    what: str


class Check:
    """One stage's run: its clock and caps, its JSON (rewritten after every change), its child processes."""

    def __init__(self, stage: str, parts: list[Part], args: argparse.Namespace, device: torch.device):
        self.stage, self.parts, self.args, self.device = stage, parts, args, device
        self.dry_run = args.dry_run
        self.cap_scale = DRY_RUN_CAP_SCALE if self.dry_run else 1.0
        self.cap_s = args.cap if args.cap is not None else STAGES[stage][0] * self.cap_scale
        self.deadline = STARTED + self.cap_s  # hard: the watchdog's
        # A stopped child gets stop_grace seconds after SIGINT: the parts' own checks stop in time for that.
        self.stop_grace = min(STOP_GRACE_S, 0.2 * self.cap_s)
        self.soft_stage_deadline = self.deadline - self.stop_grace - 0.5
        self.part_deadline = self.deadline
        self.results_dir = os.path.abspath(args.results)
        self.logs = os.path.join(self.results_dir, f"gpu_{stage}")
        os.makedirs(self.logs, exist_ok=True)
        self.path = os.path.join(self.results_dir, f"gpu_{stage}.json")
        self.work = args.work or tempfile.mkdtemp(prefix=f"gpu_check_{stage}_")
        self.lock = threading.RLock()
        self.children: list[subprocess.Popen] = []
        self.finished = False
        self.current: dict | None = None
        self.doc = {"stage": stage, "dry_run": self.dry_run, "status": "running", **environment(device),
                    "cap_seconds": self.cap_s, "seconds": 0.0, "data": "DIR" if args.data else None,
                    "parts": [{"name": p.name, "what": p.what, "status": "not run", "estimate_seconds": p.estimate_s,
                               "cap_seconds": self.part_cap(p)} for p in parts],
                    "summary": None}

    # --- sizes and time -------------------------------------------------------------------------------
    def part_cap(self, part: Part) -> float:
        """A part's own cap in this run (a dry run's is the GPU's x DRY_RUN_CAP_SCALE)."""
        return part.cap_s * self.cap_scale

    def pick(self, gpu, dry):
        """A size: `gpu` on the GPU, `dry` in a dry run (same code path, CPU-sized)."""
        return dry if self.dry_run else gpu

    def soft_deadline(self) -> float:
        """The time.monotonic() after which a part starts nothing new and stops its children."""
        return min(self.part_deadline, self.soft_stage_deadline)

    def which_cap(self) -> str:
        which = "the part's cap" if self.part_deadline <= self.soft_stage_deadline else "the stage cap"
        return f"{which} after {time.monotonic() - self.part_started:.0f} s"

    def cut_short(self, done: int, planned: int, what: str) -> None:
        """An in-process part that stopped at its deadline with `done` of `planned` measurements says so."""
        if done < planned:
            self.current["status_override"] = f"cut: {self.which_cap()}, {done} of {planned} {what}"

    def left(self) -> float:
        """Seconds until the part's cap or the stage's, whichever comes first."""
        return self.soft_deadline() - time.monotonic()

    # --- the JSON ----------------------------------------------------------------------------------------
    @property
    def figures(self) -> dict:
        return self.current.setdefault("figures", {})

    def save(self) -> None:
        with self.lock:
            self.doc["seconds"] = round(time.monotonic() - STARTED, 1)
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.doc, f, indent=1, default=str)
            os.replace(tmp, self.path)

    # --- child processes ---------------------------------------------------------------------------------
    def log_path(self, name: str) -> str:
        return os.path.join(self.logs, f"{name}.log")

    def start(self, argv: list[str], log_name: str) -> subprocess.Popen:
        """A child in its own session (so a stop reaches its whole tree), output to RESULTS/gpu_<stage>/<log>.log,
        the project on its PYTHONPATH (the GPU machine has it as a plain checkout, not installed)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(self.log_path(log_name), "w") as log:
            log.write("$ " + " ".join(argv) + "\n")
            log.flush()
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        with self.lock:
            self.children.append(proc)
        return proc

    def wait(self, procs: list[subprocess.Popen], poll: Callable[[], None] | None = None) -> None:
        """Until every proc ends; calls poll() every 0.2 s; raises CapReached (after stopping them) at the cap."""
        while any(p.poll() is None for p in procs):
            if self.left() <= 0:
                for p in procs:
                    stop_tree(p, self.stop_grace)
                raise CapReached(self.which_cap())
            if poll:
                poll()
            time.sleep(0.2)

    def say(self, line: str) -> None:
        """Print a line, unless the summary is already out: it must stay the last line (the watchdog may print it
        while the main thread is still finishing a part)."""
        with self.lock:
            if not self.finished:
                print(line, flush=True)

    def run_command(self, argv: list[str], log_name: str) -> int:
        proc = self.start(argv, log_name)
        self.wait([proc])
        return proc.returncode

    # --- the stage -----------------------------------------------------------------------------------------
    def run(self) -> int:
        print(f"gpu-check {self.stage}: {'DRY RUN (CPU-sized) ' if self.dry_run else ''}on {self.doc['device']}, "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}; cap {self.cap_s:.0f} s; "
              f"results {self.path}", flush=True)
        self.save()
        watchdog = threading.Thread(target=self._watchdog, daemon=True)
        watchdog.start()
        for part, entry in zip(self.parts, self.doc["parts"]):
            if self.args.parts and part.name not in self.args.parts:
                entry["status"] = "skipped (--parts)"
                continue
            if time.monotonic() >= self.soft_stage_deadline:
                entry["status"] = "cut: stage cap reached before it started"
                continue
            self._run_part(part, entry)
        return self._finish()

    def _run_part(self, part: Part, entry: dict) -> None:
        with self.lock:
            self.current = entry
            self.part_started = time.monotonic()
            self.part_deadline = self.part_started + self.part_cap(part)
            entry["status"] = "running"
        self.say(f"== {part.name} (estimate {part.estimate_s:.0f} s, cap {self.part_cap(part):.0f} s, "
                 f"{self.deadline - time.monotonic():.0f} s left in the stage): {part.what}")
        self.save()
        try:
            part.run(self)
            status = entry.get("status_override") or "ok"
        except CapReached as e:
            status = f"cut: {e}"
        except Exception as e:  # noqa: BLE001 - one broken part must not cost the others' figures
            status = "failed"
            entry["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            with open(self.log_path(part.name), "a") as log:
                log.write(traceback.format_exc())
            self.say(traceback.format_exc()[-2000:])
        with self.lock:
            entry.pop("status_override", None)
            entry["status"] = status
            entry["seconds"] = round(time.monotonic() - self.part_started, 1)
            self.save()
        self.say(f"   {part.name}: {status} in {entry['seconds']:.0f} s"
                 + (f"; {entry['summary']}" if entry.get("summary") else "")
                 + (f"; {entry['error']}" if entry.get("error") else ""))

    def _finish(self, cut_by_watchdog: bool = False) -> int:
        with self.lock:
            if self.finished:
                return 3
            self.finished = True
            statuses = [p["status"] for p in self.doc["parts"]]
            ran = [p for p in self.doc["parts"] if p["status"] not in ("not run", "skipped (--parts)")]
            failed = any(s == "failed" for s in statuses)
            cut = cut_by_watchdog or any(s.startswith("cut") for s in statuses)
            self.doc["status"] = "failed" if failed else "cut" if cut else "ok"
            ok = sum(s == "ok" for s in statuses)
            figures = "; ".join(p["summary"] for p in self.doc["parts"] if p.get("summary"))
            self.doc["summary"] = (f"gpu-check {self.stage}{' (dry run)' if self.dry_run else ''}: "
                                   f"{ok}/{len(ran)} parts ok"
                                   + (f", {sum(s.startswith('cut') for s in statuses)} cut by the cap" if cut else "")
                                   + (", FAILED: " + ", ".join(p["name"] for p in ran if p["status"] == "failed")
                                      if failed else "")
                                   + f" in {time.monotonic() - STARTED:.0f} s on {self.doc['device']}"
                                   + (f" | {figures}" if figures else "") + f" -> {self.path}")
            self.save()
        if not self.args.work and not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        print(self.doc["summary"], flush=True)
        return 1 if failed else 3 if cut else 0

    def _watchdog(self) -> None:
        """The hard stage cap: whatever runs when it ends is stopped, its JSON written, the process ended."""
        while time.monotonic() < self.deadline:
            time.sleep(0.1)
            if self.finished:
                return
        with self.lock:
            if self.finished:
                return
            for proc in self.children:
                stop_tree(proc, grace=0)
            if self.current is not None and self.current["status"] == "running":
                self.current["status"] = "cut: stage cap (the watchdog stopped it)"
                self.current["seconds"] = round(time.monotonic() - self.part_started, 1)
            for entry in self.doc["parts"]:
                # As the loop says of a part the soft cap kept from starting: the cap can also fall between two
                # parts (one just ended by a deadline of its own), and the rest read "not run", as if never planned.
                if entry["status"] == "not run":
                    entry["status"] = "cut: stage cap reached before it started"
            code = self._finish(cut_by_watchdog=True)
            # The summary is out and must stay the last line: ending the DataLoader workers of an in-process part
            # makes torch raise in the main thread, whose traceback would follow it. Nothing is said after this.
            sys.stdout.flush()
            sys.stderr.flush()
            quiet = os.open(os.devnull, os.O_WRONLY)
            os.dup2(quiet, 1)
            os.dup2(quiet, 2)
        end_tree(descendants(os.getpid()))  # e.g. an in-process part's DataLoader workers
        os._exit(code)


def stop_tree(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGINT a child (a study then records that it was interrupted), then SIGKILL all that is left of its tree."""
    if proc.poll() is not None:
        return
    tree = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except OSError:
        pass
    try:
        proc.wait(timeout=grace) if grace else None
    except subprocess.TimeoutExpired:
        pass
    tree = sorted(set(tree + descendants(proc.pid) + [proc.pid]))
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    end_tree(tree)
    proc.poll()


def environment(device: torch.device) -> dict:
    """Where the figures come from: device, versions, the machine."""
    env = {"device": pipeline_bench.device_name(device), "device_type": device.type, "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
           else None, "python": platform.python_version(), "cpu_cores": os.cpu_count(), "git_sha": git_sha(),
           "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    from importlib import metadata

    try:
        env["torchvision"] = metadata.version("torchvision")  # not imported: seconds that no part may need
    except metadata.PackageNotFoundError:
        env["torchvision"] = None
    try:  # the DataLoader workers' batches pass through it (16 workers x 2 batches of 6 MiB: ~200 MiB on the GPU)
        env["shm_free_gib"] = round(shutil.disk_usage("/dev/shm").free / 2**30, 2)
    except OSError:
        env["shm_free_gib"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), gpus_visible=torch.cuda.device_count(),
                   compute_capability=f"{props.major}.{props.minor}", **nvidia_smi())
    for name, module in (("ray", "ray"), ("dali", "nvidia.dali")):
        env[name] = installed_version(module)
    return env


def nvidia_smi() -> dict:
    """The driver's version and the GPU's compute mode (an exclusive one lets one process at a time use the GPU:
    seed000's three runs and the packed trials would fail), where nvidia-smi answers; else nothing."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,compute_mode", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.splitlines()
        driver, mode = (v.strip() for v in out[0].split(","))
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return {}
    return {"driver": driver, "compute_mode": mode}


def installed_version(module: str) -> str | None:
    """A package's version without importing it into this process (a core stage never imports Ray or DALI)."""
    from importlib import metadata

    dist = {"ray": "ray", "nvidia.dali": None}[module]
    try:
        if dist:
            return metadata.version(dist)
        return next((d.version for d in metadata.distributions()
                     if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")), None)
    except metadata.PackageNotFoundError:
        return None


# ==================================================================================================== core
def train_step(check: Check) -> None:
    """train_throughput.py's variants and their round-robin median, in one run, with MFU."""
    device = check.device
    args = argparse.Namespace(data=check.args.data, images=check.pick(50_000, 512), batch_size=check.pick(512, 32),
                              steps=check.pick(50, 3), warmup=check.pick(20, 2), repeats=check.pick(3, 2),
                              model=check.pick("resnet18", "small"), no_compile=False,
                              # A dry run compiles with Dynamo + AOTAutograd but not Inductor: Inductor's CPU code
                              # (C++ through gcc) is not what a GPU runs, and takes minutes on 2 loaded cores.
                              compile_backend=check.pick(None, "aot_eager"))
    figures = check.figures
    figures.update(model=args.model, batch_size=args.batch_size, steps_per_measurement=args.steps,
                   warmup_steps=args.warmup, repeats=args.repeats, compile_backend=args.compile_backend or "inductor")
    peak = step_bench.measured_matmul_flops(device, size=check.pick(8192, 256), iters=check.pick(20, 2))
    figures.update(measured_bf16_matmul_tflops=float(f"{peak / 1e12:.4g}"),  # a dry run's CPU: ~0.001
                   datasheet_bf16_tflops=(step_bench.peak_flops(check.doc["device"]) or 0) / 1e12 or None,
                   train_flops_per_image=step_bench.train_flops_per_image(step_bench.MODELS[args.model]))
    check.save()
    cfg = load_config(None, step_bench.MODELS[args.model] + step_bench.AUGMENT)
    runners, source, images = step_bench.make_runners(args, cfg, device)
    figures.update(images=images, data=source)
    try:
        # A compile slower than planned is stopped in time for one round of measurements (seconds on the GPU)
        # within the part's cap: the compiled row is lost, the others and the parts after this one are not.
        warmup_deadline = check.soft_deadline() - check.pick(MEASURE_ROUND_S, 1.0)
        figures["warmup_deadline_seconds"] = round(warmup_deadline - check.part_started, 1)  # from the part's start
        warmup_seconds, failed, cut = step_bench.warm_up(runners, args.warmup, device, deadline=warmup_deadline)
        figures.update(warmup_seconds=warmup_seconds, failed_variants=failed, cut_variants=cut)
        check.save()

        def on_run(rows: list[dict]) -> None:
            figures["variants"] = rows
            figures["ratios"] = step_ratios(rows)
            check.save()

        rows = step_bench.measure_all(runners, args, device, warmup_seconds, peak, deadline=check.soft_deadline(),
                                      on_run=on_run)
        on_run(rows)
    finally:
        step_bench.close_runners(runners.values())
        del runners
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    check.cut_short(min((len(r["runs"]) for r in rows), default=0), args.repeats, "repeats")
    if cut:
        check.current["status_override"] = "cut: " + "; ".join(f"{k}: {v}" for k, v in cut.items())
    if failed:
        check.current["status_override"] = "failed"
        check.current["error"] = "; ".join(f"{k}: {v}" for k, v in failed.items())
    by = {r["variant"]: r for r in rows}
    best = by.get("ray_cifar-bf16-channels_last-compile") or by.get("ray_cifar-bf16-channels_last")
    if best:
        mfu, ratio = best.get("mfu_of_measured_peak"), best.get("vs_plain_pytorch")
        # No ratio where the baseline failed (its error is the part's, above): the figure still stands.
        check.current["summary"] = (f"{best['variant'].removeprefix('ray_cifar-')} {best['images_per_second']:,.0f} img/s"
                                    + (f" = {ratio:.2f}x plain PyTorch" if ratio else " (no plain PyTorch baseline)")
                                    + (f", MFU {mfu:.1%} of the measured {peak / 1e12:.3g} TFLOP/s" if mfu else ""))


def step_ratios(rows: list[dict]) -> dict:
    by = {r["variant"]: r["images_per_second"] for r in rows}
    pairs = {"bf16_channels_last_compile / plain_pytorch": ("ray_cifar-bf16-channels_last-compile", "plain-pytorch-fp32"),
             "bf16_channels_last / plain_pytorch": ("ray_cifar-bf16-channels_last", "plain-pytorch-fp32"),
             "fp32_nchw / plain_pytorch": ("ray_cifar-fp32-nchw", "plain-pytorch-fp32"),
             "bf16_channels_last / fp32_nchw": ("ray_cifar-bf16-channels_last", "ray_cifar-fp32-nchw"),
             "compile / bf16_channels_last": ("ray_cifar-bf16-channels_last-compile", "ray_cifar-bf16-channels_last")}
    return {k: round(by[a] / by[b], 3) for k, (a, b) in pairs.items() if a in by and b in by}


def seed000(check: Check) -> None:
    """The published 15-epoch lr sweep, three one-process runs at once, each through `python -m ray_cifar.train`."""
    published = [p for p in load_config(os.path.join(ROOT, STUDY), []).published
                 if p["where"].get("train.epochs") == 15]
    sizes = check.pick([], TINY_MODEL + ["train.epochs=2", "data.train_subset=400", "data.val_size=100",
                                         "train.global_batch_size=64", "train.torch_threads=1"])
    runs = []
    for entry in published:
        lr = entry["where"]["optim.lr"]
        output = os.path.join(check.work, f"seed000_lr{lr:g}")
        sets = [f"{k}={v}" for k, v in entry["where"].items()] + ["data.pipeline=torch"] + sizes
        argv = [sys.executable, "-m", "ray_cifar.train", "--config", STUDY, "--output", output]
        argv += (["--data", check.args.data] if check.args.data else []) + [a for s in sets for a in ("--set", s)]
        runs.append({"lr": lr, "published_test_acc": entry["value"], "output": output, "started": time.monotonic(),
                     "proc": check.start(argv, f"seed000_lr{lr:g}")})
    check.figures.update(study=STUDY, runs_at_once=len(runs), overrides=sizes,
                         note="val = 5,000 held-out train images; test_acc of the best epoch by val_acc, evaluated once")

    def progress() -> None:
        check.figures["runs"] = [seed_run_figures(r) for r in runs]

    last_save = [0.0]

    def poll() -> None:
        for r in runs:
            if "seconds" not in r and r["proc"].poll() is not None:
                r["seconds"] = round(time.monotonic() - r["started"], 1)
        if time.monotonic() - last_save[0] > 10:
            last_save[0] = time.monotonic()
            progress()
            check.save()

    try:
        check.wait([r["proc"] for r in runs], poll)
    finally:
        poll()
        progress()
        check.save()
    failed = [r for r in runs if r["proc"].returncode != 0]
    if failed:
        logs = ", ".join(check.log_path("seed000_lr%g" % r["lr"]) for r in failed)
        raise RuntimeError(f"{len(failed)} run(s) failed (exit {[r['proc'].returncode for r in failed]}); logs: {logs}")
    figures = check.figures["runs"]
    check.current["summary"] = ("seed000 test_acc " + " / ".join(f"{f['test_acc']:.2f}" for f in figures)
                                + " (published " + " / ".join(f"{f['published_test_acc']}" for f in figures) + ")"
                                + f", {max(f['wall_seconds'] for f in figures):.0f} s")


def seed_run_figures(run: dict) -> dict:
    rows = sorted(ResultsLog(run["output"]).read(), key=lambda r: r["epoch"])
    figures = {"lr": run["lr"], "published_test_acc": run["published_test_acc"], "test_acc": None,
               "epochs_done": len(rows), "wall_seconds": run.get("seconds", round(time.monotonic() - run["started"], 1))}
    if rows:
        figures.update(last_val_acc=round(100 * rows[-1]["val_acc"], 2),
                       best_val_acc=round(100 * max(r["val_acc"] for r in rows), 2),
                       median_images_per_second=round(sorted(r["images_per_second"] for r in rows)[len(rows) // 2]),
                       train_seconds=round(sum(r["epoch_seconds"] + r["eval_seconds"] for r in rows), 1))
    test = os.path.join(run["output"], "test.json")
    if os.path.exists(test):
        with open(test) as f:
            measured = json.load(f)
        figures.update(test_acc=round(100 * measured["test_acc"], 2), best_epoch=measured["best_epoch"],
                       vs_published=round(100 * measured["test_acc"] - run["published_test_acc"], 2))
    return figures


def pytest_part(check: Check, files: list[str], log_name: str) -> None:
    """`pytest -m gpu FILES`; counts, failures and skips from its JUnit XML. A dry run's tests skip one by one (no
    GPU); on the GPU a skipped one (CUDA unseen in pytest's process, say) fails the part. Cut by a cap, pytest
    writes no XML: the outcomes it printed so far (-v, a line a test) are kept instead."""
    xml = os.path.join(check.logs, f"{log_name}.xml")
    try:
        rc = check.run_command([sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider",
                                "--junitxml", xml, *files], log_name)
    except CapReached:
        done = outcomes_so_far(check.log_path(log_name))
        check.figures.update(files=files, outcomes_before_the_cap=done)
        check.current["summary"] = (f"{log_name}: before the cap, {sum(o == 'PASSED' for o in done.values())} "
                                    f"passed, {sum(o != 'PASSED' for o in done.values())} not: "
                                    + (", ".join(f"{k} {v}" for k, v in done.items() if v != "PASSED") or "none"))
        raise
    counts = junit_counts(xml)
    check.figures.update(files=files, exit_status=rc, **counts)
    passed = counts.get("tests", 0) - sum(counts.get(k, 0) for k in ("failures", "errors", "skipped"))
    check.current["summary"] = (f"{log_name}: {passed} passed, {counts.get('failures', 0) + counts.get('errors', 0)} "
                                f"failed, {counts.get('skipped', 0)} skipped")
    if rc != 0:  # (exit 5, no test run: a file skipped whole says why in its skip)
        why = (", ".join(counts.get("failed", [])) or "; ".join(f"skipped {s}" for s in counts.get("skips", []))
               or "see " + check.log_path(log_name))
        raise RuntimeError(f"pytest exit {rc}: {why}")
    if counts.get("skipped") and not check.dry_run:  # (pytest's exit 0): on the GPU each must run, or it proved nothing
        raise RuntimeError(f"{counts['skipped']} of {counts['tests']} skipped on the GPU: {'; '.join(counts['skips'])}")


def outcomes_so_far(log: str) -> dict:
    """{test: PASSED | FAILED | SKIPPED | ERROR | ...} from the lines `pytest -v` printed."""
    with open(log, errors="replace") as f:
        return {m[1]: m[2] for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", f.read(),
                                                re.MULTILINE)}


def junit_counts(path: str) -> dict:
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    counts["skips"] = [f"{case.get('name')} ({skip_reason(case.find('skipped'))})" for case in suite.iter("testcase")
                       if case.find("skipped") is not None]
    return counts


def skip_reason(skipped: ElementTree.Element) -> str:
    """pytest's reason for a skip. A module skipped whole (importorskip: DALI not importable, say) has the message
    "collection skipped" and its reason in the text, as (path, line, 'Skipped: reason')."""
    message, text = skipped.get("message") or "", (skipped.text or "").strip()
    if message != "collection skipped" or not text:
        return message
    try:
        return str(ast.literal_eval(text)[2]).removeprefix("Skipped: ")
    except (ValueError, SyntaxError, TypeError, IndexError):
        return text


def cuda_tests(check: Check) -> None:
    pytest_part(check, CORE_GPU_TESTS, "cuda_tests")


def loader_args(check: Check, seconds: float) -> argparse.Namespace:
    """data_pipeline.py's arguments: `seconds` per measurement on the GPU, 3 repeats, all 50,000 train images."""
    return argparse.Namespace(batch_size=check.pick(512, 64), seconds=check.pick(seconds, 0.2), repeats=check.pick(3, 1),
                              images=check.pick(50_000, 512))


def loaders_on_device(check: Check, args: argparse.Namespace, dali: bool):
    """The train images on the device and a maker of each set's loaders (data_pipeline.feeds)."""
    device = check.device
    dataset, images_np, labels_np, split = pipeline_bench.first_train_images(check.args.data, args.images, device)

    def make_feeds(set_name):
        return pipeline_bench.feeds(set_name, args, split, images_np, labels_np, device, dali=dali)

    return dataset, make_feeds


def measure_loaders(check: Check, dali: bool, seconds: float) -> tuple[pipeline_bench.Recorder, dict, object]:
    args = loader_args(check, seconds)
    dataset, make_feeds = loaders_on_device(check, args, dali)
    record = pipeline_bench.Recorder(args.repeats)

    def on_figure() -> None:
        check.figures.update(**record.figures(), ratios=pipeline_bench.loader_ratios(record.results, check.device))
        check.save()

    check.figures.update(batch_size=args.batch_size, seconds_per_measurement=args.seconds, repeats=args.repeats,
                         images=args.images, dataloader_workers=os.cpu_count())
    pipeline_bench.measure_loaders(record, make_feeds, args, check.device, deadline=check.soft_deadline(),
                                   on_figure=on_figure)
    on_figure()
    loaders = 3 if dali else 2  # torchvision-dataloader, torch-batch (, dali-*)
    check.cut_short(len(record.results) + len(record.errors), loaders * len(pipeline_bench.SETS), "loader figures")
    return record, args, dataset


def none_failed(record: pipeline_bench.Recorder) -> None:
    """A part whose loaders measured what they could still fails, once its figures are kept, where one failed."""
    if record.errors:
        sets: dict[tuple[str, str], list[str]] = {}  # (path, error) -> the sets it failed on
        for e in record.errors:
            sets.setdefault((e["path"], e["error"]), []).append(e["set"])
        raise RuntimeError("; ".join(f"{path} failed on {', '.join(s)}: {error}" for (path, error), s in sets.items())
                           + " (the other loaders were measured)")


def augment(check: Check) -> None:
    record, _, _ = measure_loaders(check, dali=False, seconds=1.0)  # 2 sets x 2 loaders x 3 x 1 s + 2 worker starts
    ratios = check.figures["ratios"]
    check.current["summary"] = "torch path / DataLoader " + ", ".join(
        f"{k.split(':')[0]} {v:.1f}x" for k, v in ratios.items() if k.endswith("torch-batch / torchvision-dataloader"))
    none_failed(record)


# ===================================================================================================== ray
def study_sets(check: Check, *extra: str) -> list[str]:
    # train.use_gpu=true on the GPU: a Ray that finds no GPU (NVML unusable in a container) is refused up front in
    # one line, instead of ResNet-18 training on the CPU until each part's cap. The GPU's studies start Ray's
    # dashboard, as a user's do; the dry run's three on 2 cores do not (one-rank trials need none; ~3.5 CPU-s each).
    sizes = check.pick(["model.name=resnet18", "train.global_batch_size=512", "train.use_gpu=true"],
                       TINY_MODEL + ["data.train_subset=400", "data.val_size=100", "train.global_batch_size=64",
                                     "train.torch_threads=1", "tune.dashboard=false"])
    return ["train.num_workers=1", "data.pipeline=torch", *sizes, *extra]


def asha_sets(check: Check) -> list[str]:
    """ASHA over lr: four trials on the GPU; two in a dry run (the same code; one Ray start less of CPU work)."""
    grid = check.pick("[0.4, 0.2, 0.1, 0.05]", "[0.4, 0.05]")
    return ["tune.scheduler=asha", "tune.grace_period=1", "tune.reduction_factor=2", "train.epochs=2",
            f"tune.search_space={{optim.lr: {{grid: {grid}}}}}"]


def run_study(check: Check, name: str, sets: list[str], poll=None) -> tuple[str, float, int]:
    """`python -m ray_cifar.tune` with `sets`: (output folder, wall seconds, exit status)."""
    output = os.path.join(check.work, name)
    argv = [sys.executable, "-m", "ray_cifar.tune", "--output", output]
    argv += (["--data", check.args.data] if check.args.data else []) + [a for s in sets for a in ("--set", s)]
    started = time.monotonic()
    proc = check.start(argv, name)
    check.wait([proc], (lambda: poll(proc, output)) if poll else None)
    return output, round(time.monotonic() - started, 1), proc.returncode


def study_trials(output: str) -> list[dict]:
    """trials.parquet's rows (ranked best first); [] where the study wrote none."""
    import pyarrow.parquet as pq

    trials_file = os.path.join(output, "trials.parquet")
    return pq.read_table(trials_file).to_pylist() if os.path.exists(trials_file) else []


def best_trial_test_acc(trials: list[dict]) -> float | None:
    """The test accuracy (%) of the best trial with one; None where no trial has it."""
    best = next((t for t in trials if t.get("test_acc") is not None), None)
    return round(100 * best["test_acc"], 2) if best else None


def study_figures(output: str, wall: float) -> dict:
    rows, trials = ResultsLog(output).read(), study_trials(output)
    images = sum(r.get("train_images") or 0 for r in rows)
    statuses: dict[str, int] = {}
    for t in trials:
        statuses[t["status"]] = statuses.get(t["status"], 0) + 1
    startups = sorted(r["startup_seconds"] for r in rows if r.get("startup_seconds") is not None)
    epoch_ips = sorted(r["images_per_second"] for r in rows if r.get("images_per_second"))
    return {"wall_seconds": wall, "trials": len(trials), "trial_statuses": statuses, "trial_epochs": len(rows),
            "train_images": images, "study_images_per_second": round(images / wall, 1) if wall else None,
            "median_epoch_images_per_second": epoch_ips[len(epoch_ips) // 2] if epoch_ips else None,
            "study_vs_epoch_images_per_second": round(images / wall / epoch_ips[len(epoch_ips) // 2], 3)
            if epoch_ips and wall else None,
            "median_startup_seconds": startups[len(startups) // 2] if startups else None,
            "best_trial_test_acc": best_trial_test_acc(trials)}


def study_ended_well(check: Check, name: str, rc: int) -> None:
    """A study part's own failures: its exit status, and a best trial with no test figure (the test split's
    evaluation, a Ray task on the GPU, prints its error and the study goes on: the part must not say ok)."""
    if rc != 0:
        raise RuntimeError(f"the study exited {rc}: see {check.log_path(name)}")
    if check.figures.get("best_trial_test_acc") is None:
        raise RuntimeError(f"the best trial has no test_acc (its test evaluation failed?): see {check.log_path(name)}")


def asha(check: Check) -> None:
    output, wall, rc = run_study(check, "asha", study_sets(check, *asha_sets(check), "tune.max_concurrent_trials=1"))
    check.figures.update(study_figures(output, wall), exit_status=rc)
    study_ended_well(check, "asha", rc)
    f = check.figures
    # The study's img/s over its wall time against an epoch's own: what Tune, start-up and evaluation cost.
    share = f["study_vs_epoch_images_per_second"]
    check.current["summary"] = (f"ASHA {f['trials']} trials one at a time {wall:.0f} s ({f['trial_epochs']} trial-epochs"
                                + (f", study img/s {share:.1%} of an epoch's)" if share is not None else ")"))


def packed(check: Check) -> None:
    at_once = check.pick(4, 2)  # the dry run's 2 CPU cores fit two tiny trials
    output, wall, rc = run_study(check, "packed", study_sets(check, *asha_sets(check), "train.gpus_per_worker=0.25",
                                                             f"tune.max_concurrent_trials={at_once}"))
    figures = check.figures
    figures.update(study_figures(output, wall), exit_status=rc, trials_at_once=at_once)
    one_at_a_time = next((p.get("figures") for p in check.doc["parts"] if p["name"] == "asha"), None)
    if one_at_a_time and one_at_a_time.get("study_images_per_second") and figures["study_images_per_second"]:
        figures["packing_speedup"] = round(figures["study_images_per_second"]
                                           / one_at_a_time["study_images_per_second"], 2)  # images/s, same run
        figures["wall_ratio"] = round(one_at_a_time["wall_seconds"] / wall, 2)
    study_ended_well(check, "packed", rc)
    check.current["summary"] = (f"packed {at_once} a GPU {wall:.0f} s"
                                + (f", {figures['packing_speedup']}x the study img/s of one at a time"
                                   if "packing_speedup" in figures else ""))


def kill_resume(check: Check) -> None:
    """One one-rank trial (it trains in its Tune trial process): SIGKILL that process once epoch 1 is recorded;
    Tune runs the trial again (tune.max_failures) from its latest checkpoint, and it must finish."""
    # On the GPU 8 short epochs of 6,000 images (0.6-1 s each with its evaluation and its 90 MB checkpoint): the
    # poll, every 0.2 s, kills after the first with seven (~5 s) to go. 5 epochs left ~3 s, 3 epochs of 10,000
    # (the same images) two: epochs faster than estimated, or a row recorded late by a busy driver, could end the
    # trial before the kill lands, and the part fail with nothing resumed. The dry run's epochs: 6.
    epochs = check.pick(8, 6)
    sets = study_sets(check, "tune.scheduler=fifo", "tune.search_space={}", f"train.epochs={epochs}",
                      "tune.max_failures=1", *check.pick(["data.train_subset=6000"], []))
    killed: dict = {}

    def poll(proc: subprocess.Popen, output: str) -> None:
        if killed:
            return
        last = max((r["epoch"] for r in ResultsLog(output).read()), default=0)
        if last < 1:
            return
        if last >= epochs - 1:
            # Too late: the kill would land on a trial ending or ended (its process kept for reuse by Tune, idle),
            # and the part would fail as "no epoch says it resumed"; it fails as too late instead, below.
            killed.update(too_late=last)
            return
        trial_processes = [p for p in descendants(proc.pid) if "ray::ImplicitFunc" in cmdline(p)]
        if trial_processes:
            os.kill(trial_processes[-1], signal.SIGKILL)
            killed.update(after_epoch=last, at=time.monotonic())

    output, wall, rc = run_study(check, "kill_resume", sets, poll)
    rows = sorted(ResultsLog(output).read(), key=lambda r: r["epoch"])
    figures = check.figures
    try:
        with open(os.path.join(output, "trials.json")) as f:
            status = next(iter(json.load(f).values()))["status"]
    except (OSError, ValueError, StopIteration):
        status = "unknown (no trials.json)"
    test_acc = best_trial_test_acc(study_trials(output))
    resumed = [r for r in rows if r.get("resumed_from_epoch")]
    figures.update(exit_status=rc, wall_seconds=wall, epochs=[r["epoch"] for r in rows], trial_status=status,
                   test_acc=test_acc,
                   killed_after_epoch=killed.get("after_epoch"),
                   resumed_from_epoch=resumed[0]["resumed_from_epoch"] if resumed else None,
                   train_loss=[round(r["train_loss"], 4) for r in rows], val_acc=[round(r["val_acc"], 4) for r in rows])
    problems = []
    if "after_epoch" not in killed:
        problems.append("the trial ended before its process could be killed"
                        + (f" (epoch {killed['too_late']} of {epochs} was recorded when it was first seen)"
                           if "too_late" in killed else ""))
    if rc != 0 or status != "completed":
        problems.append(f"the study exited {rc}, trial {status}")
    elif test_acc is None:
        problems.append("the trial has no test_acc (its test evaluation failed?)")
    if [r["epoch"] for r in rows] != list(range(1, epochs + 1)):
        problems.append(f"epochs recorded {[r['epoch'] for r in rows]}, not 1..{epochs} once each")
    if "after_epoch" in killed and not resumed:
        problems.append("no epoch says it resumed from a checkpoint")
    if resumed and resumed[0]["train_loss"] >= rows[0]["train_loss"]:
        problems.append("the first epoch after the restart has a train loss no lower than epoch 1's: "
                        "it did not continue from the checkpoint")
    if problems:
        raise RuntimeError("; ".join(problems) + f" (log {check.log_path('kill_resume')})")
    after = resumed[0]
    check.current["summary"] = (f"killed after epoch {killed['after_epoch']}, resumed from epoch "
                                f"{after['resumed_from_epoch']}, all {epochs} epochs once, completed")


# ==================================================================================================== dali
def dali_tests(check: Check) -> None:
    pytest_part(check, DALI_GPU_TESTS, "dali_tests")


def loaders(check: Check) -> None:
    """DALI GPU vs torch path vs DataLoader: the measurement data.pipeline=auto reads for this device type."""
    # 1 s a measurement, as augment's: ~100-400 batches of 512 from the GPU loaders, ~30 from the DataLoader
    record, args, dataset = measure_loaders(check, dali=True, seconds=1.0)  # 2 sets x 3 loaders x 3 x 1 s + builds
    # Written also where a loader failed (DALI's GPU build, say): the others' figures, and the failure, which
    # data.pipeline=auto reads (it then takes the torch path on this device type and says why).
    out = pipeline_bench.results_document(args, check.device, dataset.source, args.images, record,
                                          pipeline_bench.loader_ratios(record.results, check.device))
    name = f"data_pipeline_{check.device.type}.json"
    check.figures["measurement_file"] = pipeline_bench.write_json(out, check.results_dir, name)
    if not check.dry_run:  # a dry run never replaces the package's committed measurement
        from ray_cifar.data.pipelines import BENCHMARK_RESULTS

        check.figures["package_measurement"] = pipeline_bench.write_json(out, BENCHMARK_RESULTS, name)
    ratios = check.figures["ratios"]
    dali_name = f"dali-{'gpu' if check.device.type == 'cuda' else 'cpu'}"
    versus = f"{dali_name} / torchvision-dataloader"
    if not any(k.endswith(versus) for k in ratios):  # DALI failed: what was measured without it
        dali_name, versus = "torch path", "torch-batch / torchvision-dataloader"
    check.current["summary"] = f"{dali_name} / DataLoader " + ", ".join(
        f"{k.split(':')[0]} {v:.1f}x" for k, v in ratios.items() if k.endswith(versus))
    none_failed(record)


def fed_epoch(check: Check) -> None:
    args = loader_args(check, seconds=0)  # an epoch of `images` each, not a time
    _, make_feeds = loaders_on_device(check, args, dali=True)
    record = pipeline_bench.Recorder(1)
    step = pipeline_bench.training_step(check.device, "bf16", check.pick(["model.name=resnet18"], TINY_MODEL))

    def on_figure() -> None:
        check.figures.update(record.figures())
        check.save()

    check.figures.update(images_per_epoch=args.images, batch_size=args.batch_size,
                         model=check.pick("resnet18", "tiny ResNet (dry run)"))
    ratios = pipeline_bench.measure_training(record, make_feeds, args, check.device, step=step, images=args.images,
                                             deadline=check.soft_deadline(), on_figure=on_figure)
    check.figures["ratios"] = ratios
    on_figure()
    check.cut_short(len(ratios) + len(record.errors), 3 * len(pipeline_bench.SETS), "fed epochs")
    check.current["summary"] = "epoch fed / from GPU memory: " + ", ".join(
        f"{k.split(': resnet18 fed by ')[1].split(' /')[0]} ({k.split(':')[0]}) {v:.2f}" for k, v in ratios.items())
    none_failed(record)


# ================================================================================================ ray_dali
def dali_study(check: Check) -> None:
    """The product's own path on a GPU where DALI measured faster: DALI's GPU pipeline in a Ray trial process.
    Two one-rank trials one at a time, the same but for data.pipeline: dali first (the figure this stage is for,
    should the cap come), then torch; their last epochs' images/s side by side, from one study."""
    sets = study_sets(check, "tune.scheduler=fifo", "train.epochs=2", "tune.max_concurrent_trials=1",
                      "tune.search_space={data.pipeline: {grid: [dali, torch]}}")
    output, wall, rc = run_study(check, "dali_study", sets)
    figures = check.figures
    figures.update(study_figures(output, wall), exit_status=rc)
    rows: dict[str, list[dict]] = {}
    for row in ResultsLog(output).read():
        rows.setdefault(row.get("data.pipeline"), []).append(row)
    pipelines = {}
    for name, got in rows.items():
        last = max(got, key=lambda r: r["epoch"])  # the first epoch also pays cuDNN's tuning and DALI's build
        pipelines[name] = {"fed_by": last.get("data_pipeline"), "epochs": len(got),
                           "last_epoch_images_per_second": last.get("images_per_second"),
                           "val_acc": last.get("val_acc")}
    figures["pipelines"] = pipelines
    torch_ips, dali_ips = ((pipelines.get(name) or {}).get("last_epoch_images_per_second") for name in ("torch", "dali"))
    if torch_ips and dali_ips:
        figures["dali_vs_torch_epoch_images_per_second"] = round(dali_ips / torch_ips, 3)  # one study, one device
    study_ended_well(check, "dali_study", rc)
    expected = check.pick("dali-gpu", "dali-cpu")
    fed_by = (pipelines.get("dali") or {}).get("fed_by")
    if fed_by != expected:
        raise RuntimeError(f"the dali trial was fed by {fed_by}, not {expected}: see {check.log_path('dali_study')}")
    check.current["summary"] = (f"{expected} in a Ray trial, {dali_ips:,.0f} img/s an epoch"
                                + (f" = {figures['dali_vs_torch_epoch_images_per_second']:.2f}x the torch path's"
                                   if torch_ips else ""))


# ================================================================================================= stages
# Estimates on one H100/H200 (ResNet-18 on 32x32 images: 0.56 G multiply-adds = 1.1 GFLOP forward, ~3.3 GFLOP
# a training image; eager bf16 channels_last at batch 512 ~20-30k img/s, i.e. MFU ~8-10% of a measured
# ~750 TFLOP/s; batch 128 is bound by kernel launches, ~8-10k img/s a process), Python + torch + CUDA start ~10 s
# a process.
STAGES: dict[str, tuple[float, list[Part]]] = {
    "core": (300, [
        # the first decode of CIFAR-10 into the cache (~10 s; later parts and calls reuse it) + 4 warm-ups (the compile
        # one ~45 s of Inductor for forward + backward on 16 cores) + 3 rounds x 4 variants x 50 steps x 512 images
        # (~1-2 s each; the DataLoader one is bound by 16 PIL workers) + a bf16 matmul ~2 s
        Part("train_step", 90, 130, train_step, "ResNet-18 step: plain PyTorch vs fp32 NCHW vs bf16 channels_last "
             "vs + compile, MFU against the measured bf16 matmul peak"),
        # pytest start + collection ~8 s; 5 tests on the tiny ResNet, the compile one ~20 s of it. Before seed000,
        # whose length is the least sure (three processes time-sharing one GPU, a 90 MB checkpoint fsynced every
        # epoch): run after it, an overrun there would leave these correctness checks no time.
        Part("cuda_tests", 35, 60, cuda_tests, "pytest -m gpu " + " ".join(CORE_GPU_TESTS)),
        # 3 runs x 15 epochs x 45,000 images = 2.0M images at batch 128; the three at once share the GPU (each
        # ~8k img/s: ~85 s) + 15 evaluations of 5,000 + start ~15 s + the test evaluation. Its cap is all the stage
        # can give it after the parts before, as estimated (300 - 90 - 35 = 175 s) and more: the seed table is worth
        # more than augment, the part after it, which a longer seed000 leaves less time.
        Part("seed000", 120, 200, seed000, "seed study 000's first table: ResNet-18, SGD, constant lr 0.1/0.01/0.001, "
             "15 epochs, batch 128, via python -m ray_cifar.train"),
        # 2 sets x 2 loaders x 3 repeats x 1 s + 2 DataLoader worker starts
        Part("augment", 20, 35, augment, "the torch augmentation path on the device vs the torchvision DataLoader"),
    ]),
    "ray": (240, [
        # Ray start ~8 s; 4 trials x epoch 1 + ~2 trials x epoch 2 (ASHA) x 45,000 images at ~25k img/s ~11 s;
        # trial processes reused (~1 s each, the first ~8 s); test evaluation in a GPU task ~8 s; report + exit ~8 s
        Part("asha", 50, 90, asha, "a one-GPU ASHA study of ResNet-18, 4 trials x 2 epochs, one at a time"),
        # the same work four at once: starts overlap, the GPU is shared
        Part("packed", 45, 80, packed, "the same study packed four to the GPU (train.gpus_per_worker=0.25)"),
        # Ray start ~8 s; the trial process's start ~8 s; 8 epochs x 6,000 images ~7 s with their checkpoints; the
        # killed trial's new process + resume ~15 s; the test evaluation in a GPU task ~8 s; exit ~8 s
        Part("kill_resume", 55, 85, kill_resume, "a one-rank GPU trial SIGKILLed after epoch 1, resumed by Tune"),
    ]),
    "dali": (180, [
        # pytest start + DALI import ~10 s; three GPU pipelines built, an epoch of 400 images each, a 1 s GPU sleep
        Part("dali_tests", 20, 45, dali_tests, "pytest -m gpu " + " ".join(DALI_GPU_TESTS)),
        # 2 sets x 3 loaders x 3 repeats x 1 s + builds (DALI's first imports it: ~3 s) and the loaders' starts
        Part("loaders", 26, 60, loaders, "DALI GPU vs the torch path vs the torchvision DataLoader (images/s, build s)"),
        # 7 epochs of 50,000 images (resident, 2 sets x 3 loaders) at ~25k img/s; the full-set DataLoader slower
        Part("fed_epoch", 30, 50, fed_epoch, "one ResNet-18 epoch fed by each loader and from GPU memory"),
    ]),
    # Not in a lend's plan of 12 minutes: a sixth call, where the lend still has the time (benchmarks/README.md).
    "ray_dali": (120, [
        # Ray start ~8 s; the trial process's start ~8 s, the second trial's ~1 s; 2 x 2 epochs of 45,000 images at
        # ~25k img/s ~8 s with their evaluations; DALI's build ~3 s; the test evaluation in a GPU task ~8 s; exit ~8 s
        Part("dali_study", 50, 110, dali_study, "a one-GPU study fed by DALI's GPU pipeline in its Ray trial process "
             "beside the torch path (2 trials x 2 epochs, one at a time)"),
    ]),
}
NEEDS = {"ray": [("ray", "Ray")], "dali": [("nvidia.dali", "NVIDIA DALI")],
         "ray_dali": [("ray", "Ray"), ("nvidia.dali", "NVIDIA DALI")]}


def importable(module: str) -> bool:
    """Whether `module` can be imported, without importing it (find_spec("a.b") imports a: a missing a is
    answered here, not raised, as is a finder that refuses it)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in (module.split(".")[0], module))
    except ImportError:
        return False


def fail(message: str) -> None:
    print(f"gpu_check: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--data", default=os.environ.get("RAY_CIFAR_DATA"),
                        help="CIFAR-10 folder (train/test.parquet); default $RAY_CIFAR_DATA")
    parser.add_argument("--results", default=os.path.join(HERE, "results"),
                        help="folder of gpu_<stage>.json and gpu_<stage>/ logs (default benchmarks/results)")
    parser.add_argument("--dry-run", action="store_true", help="every part CPU-sized on the CPU (no GPU needed); "
                        f"its caps are the GPU's x{DRY_RUN_CAP_SCALE:g}")
    parser.add_argument("--cap", type=float, default=None, help="the stage's wall-clock cap in seconds "
                        f"(default {', '.join(f'{k} {v[0]:.0f}' for k, v in STAGES.items())})")
    parser.add_argument("--parts", type=lambda s: [p for p in s.split(",") if p], default=None,
                        help="run only these parts (comma-separated), e.g. --parts seed000")
    parser.add_argument("--work", default=None, help="scratch folder for runs and checkpoints (default: a temporary "
                        "folder, removed at the end; never under RESULTS, which a lend carries back)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    args = parser.parse_args(argv)
    names = [p.name for p in STAGES[args.stage][1]]
    unknown = [p for p in args.parts or [] if p not in names]
    if unknown:
        fail(f"--parts: {', '.join(unknown)} not in stage {args.stage} (its parts: {', '.join(names)})")
    if args.cap is not None and args.cap <= 0:
        fail(f"--cap: must be > 0 seconds (got {args.cap:g})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data:
        fail("no CIFAR-10 folder: pass --data DIR (make: DATA=DIR) or set RAY_CIFAR_DATA")
    if not os.path.isdir(args.data):
        fail(f"--data {args.data}: no such folder")
    args.data = os.path.abspath(args.data)
    if not args.dry_run and not torch.cuda.is_available():
        fail(f"torch {torch.__version__} sees no CUDA GPU here: the check needs one; "
             "DRY_RUN=1 (--dry-run) runs every part CPU-sized instead")
    missing = [(module, name) for module, name in NEEDS.get(args.stage, []) if not importable(module)]
    if missing:
        fail(f"stage {args.stage} needs {' and '.join(f'{name} ({module})' for module, name in missing)} importable: "
             "unpack its pack and run the export line unpack.sh prints (see benchmarks/README.md, GPU check)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        # One intra-op thread: a 2-thread OpenMP region on a shared machine can wait 100x longer than it computes.
        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # and in every child
    cap, parts = STAGES[args.stage]
    return Check(args.stage, parts, args, device).run()


if __name__ == "__main__":
    sys.exit(main())
