#!/usr/bin/env bash
# Issue 35's GPU measurements in one call of the device tool, each capped so that the whole fits a 10-minute call:
#   bash .gpu/on-device.sh bash docs/experiments/gpu_issue35.sh
# 1. the paper recipe end to end (10,000 steps, batch 512, AugMix, the paper model, CUDA graphs on), its phases marked;
# 2. `bench gpu --compile` (no end-to-end row: step 1 is that row at full size);
# 3. `bench startup --gpu` (default and one-worker Ray Train; CUDA graphs on, so the capture is a row), then its
#    DDP way on the CPU (one GPU here);
# 4. the paper recipe again, eagerly (--cuda-graphs off), same seed and data as 1: whether the graphed step trains
#    as the eager one does (metrics.csv of each come back; a run cut by its cap still leaves its curve so far).
# Caps: BUDGET (540 s in all), PAPER_CAP, GPU_CAP, STARTUP_CAP, DDP_CAP, EAGER_CAP (0 skips a step). Logs go to
# $OUT (packed into one file, below); the last lines printed are a short table.
set -u
# Everything is written under $OUT/raw and packed into $OUT/issue35.tgz at the end (the device tool brings back at
# most 8 files); the tail of each log is printed as it ends.
BACK=${OUT:-/tmp/gpu-issue35}; OUT=$BACK/raw; mkdir -p "$OUT"
trap 'tar czf "$BACK/issue35.tgz" -C "$OUT" . && rm -rf "$OUT"' EXIT
T=$(mktemp -d); BUDGET=${BUDGET:-540}; t0=$(date +%s)
summary=()
step() {  # step NAME CAP COMMAND...: run it with at most CAP seconds (less if the budget is shorter)
    local name=$1 cap=$2; shift 2
    if [ "$cap" -eq 0 ]; then summary+=("$name: skipped (cap 0)"); return; fi
    local left=$((BUDGET - ($(date +%s) - t0))); [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 20 ]; then summary+=("$name: skipped, budget spent"); return; fi
    echo "== $name (at most $cap s): $*"
    local s=$(date +%s); timeout -k 5 "$cap" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    summary+=("$name: rc $rc, $(($(date +%s) - s)) s wall"); tail -n 25 "$OUT/$name.log"
}
step sanity 40 bash -c 'nvidia-smi -L; python3 -c "import torch, ray; print(torch.__version__, ray.__version__, torch.cuda.get_device_name(0))"; lscpu | grep "Model name"'
CIFARRAY_PHASES=$OUT/paper.phases step paper ${PAPER_CAP:-250} python3 -m cifarray.train densenet --synthetic --gpu --steps 10000 \
    --cuda-graphs on --out "$T/paper"
cp "$T/paper/metrics.csv" "$OUT/paper_metrics.csv" 2>/dev/null; cp "$T/paper/summary.json" "$OUT/paper_summary.json" 2>/dev/null
step gpu ${GPU_CAP:-170} python3 -m cifarray.bench gpu --compile --e2e-steps 0
# The Ray carried to the device has no dashboard build, and a local Ray starts its dashboard: an empty build folder
# lets it start (checked on the CPU with the venv's build moved aside: a 2-step --runner ray run ended normally).
python3 -c "import os, ray; os.makedirs(os.path.join(os.path.dirname(ray.__file__), 'dashboard', 'client', 'build',
    'static'), exist_ok=True)"
step startup ${STARTUP_CAP:-100} python3 -m cifarray.bench startup --gpu --ways default,ray --steps 5 --cuda-graphs on
step startup_ddp ${DDP_CAP:-60} python3 -m cifarray.bench startup --ways ddp
CIFARRAY_PHASES=$OUT/eager.phases step eager ${EAGER_CAP:-0} python3 -m cifarray.train densenet --synthetic --gpu \
    --steps 10000 --cuda-graphs off --out "$T/eager"
cp "$T/eager/metrics.csv" "$OUT/eager_metrics.csv" 2>/dev/null; cp "$T/eager/summary.json" "$OUT/eager_summary.json" 2>/dev/null
echo "== done in $(($(date +%s) - t0)) s"; printf '%s\n' "${summary[@]}"
