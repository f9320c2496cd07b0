#!/usr/bin/env bash
# The GPU suite in one command (`make gpu-bench`): CUDA tests, the data-pipeline benchmark on cuda,
# training throughput with MFU, DDP scaling over the visible GPUs, and a short real ResNet-18 study,
# one trial a GPU and packed four to a GPU (train.gpus_per_worker=0.25).
# Budget: under 20 minutes on one H100. Results JSON land in benchmarks/results/ (commit them), the
# log of each part in benchmarks/results/gpu_suite/.
#
#   benchmarks/gpu_suite.sh DATA_DIR [PYTHON]        # DATA_DIR: CIFAR-10 (train/test.parquet)
#   make gpu-bench DATA=DIR
set -euo pipefail

DATA="${1:-${RAY_CIFAR_DATA:-}}"
PY="${2:-${PYTHON:-python}}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="$ROOT/benchmarks/results"
LOGS="$RESULTS/gpu_suite"

if [ -z "$DATA" ]; then
    echo "gpu_suite: no CIFAR-10 folder: pass it as the first argument (or DATA=... to make, or RAY_CIFAR_DATA)" >&2
    exit 2
fi
# Fail fast, before any part runs, where there is no GPU: every part below needs CUDA.
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: torch.cuda.is_available() is False on this machine ($("$PY" -c 'import torch; print(torch.__version__)')):" \
         "the GPU suite needs a CUDA GPU; nothing was run" >&2
    exit 3
fi
mkdir -p "$LOGS"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
RANKS="$(seq -s ' ' 1 "$GPUS")"
START=$SECONDS

part() {  # part NAME COMMAND...: run one part, log it, time it, keep going if it fails
    local name="$1"; shift
    echo "== $name: $*"
    local t0=$SECONDS
    if "$@" > "$LOGS/$name.log" 2>&1; then status=ok; else status="FAILED (exit $?)"; fi
    echo "   $status in $((SECONDS - t0)) s; log: $LOGS/$name.log"; tail -n 5 "$LOGS/$name.log" | sed 's/^/   | /'
    echo "{\"part\": \"$name\", \"status\": \"$status\", \"seconds\": $((SECONDS - t0))}" >> "$LOGS/parts.jsonl"
}

rm -f "$LOGS/parts.jsonl"
part cuda-tests "$PY" -m pytest -m gpu -q tests                                                       # ~1 min
part data-pipeline "$PY" benchmarks/data_pipeline.py --data "$DATA" --device cuda                     # ~2 min
part train-throughput "$PY" benchmarks/train_throughput.py --data "$DATA" --device cuda --model resnet18 --images 50000  # ~3 min
part ddp-scaling "$PY" benchmarks/ddp_scaling.py --data "$DATA" --device cuda --ranks $RANKS --model resnet18  # ~2 min a count
# Short real study: the published ResNet-18 schedules at 2% of their length (1 to 6 epochs a trial), ~6 min.
part resnet18-study "$PY" -m ray_cifar.tune --config studies/resnet18_lr_schedule_wd.yaml --data "$DATA" \
    --budget-scale 0.02 --set tune.max_concurrent_trials=1 --output "$RESULTS/gpu_suite/resnet18_study"
# Packing: the same study, four 1-rank trials at once on each GPU (a quarter of it each, memory capped);
# its seconds against resnet18-study's (one trial a GPU) are the packing gain in gpu_suite.json.
part resnet18-study-packed "$PY" -m ray_cifar.tune --config studies/resnet18_lr_schedule_wd.yaml --data "$DATA" \
    --budget-scale 0.02 --set train.gpus_per_worker=0.25 --output "$RESULTS/gpu_suite/resnet18_study_packed"
"$PY" - "$LOGS/parts.jsonl" "$RESULTS/gpu_suite.json" "$GPUS" <<'PYEOF'
import json, sys, torch, datetime
parts = [json.loads(line) for line in open(sys.argv[1])]
seconds = {p["part"]: p["seconds"] for p in parts if p["status"] == "ok"}
whole, packed = seconds.get("resnet18-study"), seconds.get("resnet18-study-packed")
json.dump({"device": torch.cuda.get_device_name(0), "gpus": int(sys.argv[3]), "torch": torch.__version__,
           "time": datetime.datetime.now(datetime.timezone.utc).isoformat(), "parts": parts,
           # wall time of the study one trial a GPU / four trials a GPU (train.gpus_per_worker=0.25)
           "packing_speedup": round(whole / packed, 2) if whole and packed else None},
          open(sys.argv[2], "w"), indent=1)
PYEOF
echo "gpu_suite: done in $((SECONDS - START)) s; summary $RESULTS/gpu_suite.json; plots: $PY benchmarks/plot_results.py"
grep -q FAILED "$LOGS/parts.jsonl" && exit 1 || exit 0
