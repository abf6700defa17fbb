#!/usr/bin/env bash
# One prepared GPU check (about 5 minutes on an H100/H200), printing JSON lines:
#   1. scripts/bench_maml.py --device cuda: our MAML vs learn2learn's, same process, ms/iter, ratio, peak memory;
#   2. scripts/bench_sampler.py --device cuda: episode sampler vs learn2learn's TaskDataset;
#   3. a timed MAML Omniglot 5-way 1-shot run (experiment=maml_omniglot_5w1s) for ITERATIONS meta-iterations
#      (default 3000), then its 600-task test: ms per meta-iteration, extrapolated to the paper's 60,000.
#
# Prepare on the CPU machine, in the project's root (see ../shared/docs/gpu.md):
#   ../shared/tools/device-wheels.sh                         # hydra, learn2learn, ... as Python 3.12 wheels in .whl/
#   mkdir -p .devdata/omniglot && cp ../shared/data/omniglot/*.zip .devdata/omniglot/
# then run on the device, carrying [".whl", ".devdata"]:   bash scripts/bench_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/bench_gpu}
ITERATIONS=${ITERATIONS:-3000}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export FEWSHOT_DATA_ROOT=${FEWSHOT_DATA_ROOT:-$PWD/.devdata}
export FEWSHOT_CACHE_DIR=${FEWSHOT_CACHE_DIR:-/tmp/fewshot-cache}
if ! python3 -c "import hydra, learn2learn" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 scripts/bench_maml.py --device cuda 2>&1 | tee "$OUT/bench_maml.jsonl"
python3 scripts/bench_sampler.py --device cuda --seconds 3 2>&1 | grep '^{' | tee "$OUT/bench_sampler.jsonl"
start=$(date +%s.%N)
python3 -m fewshot.train experiment=maml_omniglot_5w1s device=cuda "trainer.iterations=$ITERATIONS" \
  trainer.val_every=1000 trainer.checkpoint_every=1000 "hydra.run.dir=$OUT/maml_omniglot_5w1s" 2>&1 \
  | tr '\r' '\n' | grep -v '^meta-train\|^validate\|^test' | tee "$OUT/train.log"
end=$(date +%s.%N)
python3 - "$OUT" "$ITERATIONS" "$start" "$end" <<'PY'
import json, sys
out, iters, start, end = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
r = json.load(open(f"{out}/maml_omniglot_5w1s/results.json"))
ms = 1000 * r["train_seconds"] / iters
print(json.dumps({"run": "maml_omniglot_5w1s", "device": r["device"], "iterations": iters, "train_ms_per_iter": round(ms, 2),
                  "projected_60k_minutes": round(ms * 60000 / 1000 / 60, 1), "wall_seconds": round(end - start, 1),
                  "test_acc": round(100 * r["test"]["acc_mean"], 2), "test_ci95": round(100 * r["test"]["acc_ci95"], 2),
                  "test_episodes": r["test"]["episodes"]}))
PY
