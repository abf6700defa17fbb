#!/usr/bin/env bash
# Paper cells at full budget, concurrently, on one offline GPU machine (one prepared call; ../shared/docs/gpu.md).
#
# Prepare once, in the project's root, on the CPU machine:
#   ../shared/tools/device-wheels.sh                     # hydra, learn2learn, ... as Python 3.12 wheels in .whl/
#   .venv/bin/pip wheel --no-deps -w .whl .              # fewshot itself, as the wheel users get
#   mkdir -p .devdata/omniglot && cp -r ../shared/data/omniglot/* .devdata/omniglot/
# Run there (carry .whl and .devdata):
#   bash scripts/gpu_cells.sh [JOB...]       JOB = "name|limit_s|fewshot-train overrides" (default: JOBS below)
# Each job runs `fewshot-train` under its own `timeout` (SIGTERM: it checkpoints and stops), all at once; then the
# run folders' results.json, metrics.csv, .hydra/ and logs go into $OUT/runs.tgz.
# Copy results.json files worth keeping into results/<preset>/ and run `make ledger`.
# LOCAL=1 skips the wheel install (a dry run of the script itself with the local .venv, e.g. on CPU).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_cells}
RUNS=${RUNS:-outputs/gpu_runs}  # run folders and logs, packed into $OUT/runs.tgz at the end
SEED=${SEED:-1}
mkdir -p "$OUT" "$RUNS"
if [ "${LOCAL:-0}" != 1 ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  PY=python3
else
  PY=${PY:-.venv/bin/python}
fi
export FEWSHOT_DATA_ROOT=${FEWSHOT_DATA_ROOT:-$PWD/.devdata} FEWSHOT_CACHE_DIR=${FEWSHOT_CACHE_DIR:-/tmp/fewshot-cache}
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
$PY -c "import torch; print('torch', torch.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

JOBS=(
  "protonet_omniglot_5w1s|500|experiment=protonet_omniglot_5w1s"
  "protonet_omniglot_20w1s|500|experiment=protonet_omniglot_20w1s"
  "matching_omniglot_5w1s|500|experiment=matching_omniglot_5w1s"
  "matching_omniglot_20w1s|500|experiment=matching_omniglot_20w1s"
  "matching_fce_omniglot_5w1s|540|experiment=matching_fce_omniglot_5w1s"
  "matching_fce_omniglot_20w1s|480|experiment=matching_fce_omniglot_20w1s trainer.iterations=6000"
  "matching_cosine_learned_5w1s|500|experiment=matching_omniglot_5w1s algo.similarity=cosine algo.scale=10 algo.learn_scale=true name=matching_omniglot_5w1s_cosine_learned"
  "maml_omniglot_5w1s|480|experiment=maml_omniglot_5w1s trainer.iterations=6000"
)
[ $# -gt 0 ] && JOBS=("$@")

# Decode Omniglot into the cache once, before the jobs start reading it.
timeout 120 $PY -c "
import os
from fewshot.data.omniglot import load_omniglot_images
load_omniglot_images(os.environ['FEWSHOT_DATA_ROOT'] + '/omniglot', os.environ['FEWSHOT_CACHE_DIR'])
" || echo "cache warm-up failed; each job decodes on its own"

start=$(date +%s)
stamp=$(mktemp)  # results.json older than this came from an earlier call (a warm machine keeps its files)
for job in "${JOBS[@]}"; do
  IFS='|' read -r name _ _ <<<"$job"
  # A fresh folder per call: an old last.pt there would be resumed instead of starting the cell anew.
  [ -e "$RUNS/$name" ] && mv "$RUNS/$name" "$RUNS/$name.$(date +%s).old"
done
for job in "${JOBS[@]}"; do
  IFS='|' read -r name limit overrides <<<"$job"
  # shellcheck disable=SC2086  # the overrides are words
  timeout "$limit" $PY -m fewshot.train $overrides seed="$SEED" device="$DEVICE" hydra.run.dir="$RUNS/$name" \
    >"$RUNS/$name.log" 2>&1 &
done
wait
echo "all jobs ended after $(( $(date +%s) - start )) s"
# A job stopped by its time limit checkpointed on SIGTERM: test its best checkpoint so its numbers are not lost
# (a reduced budget, kept apart from the full cells).
for job in "${JOBS[@]}"; do
  IFS='|' read -r name _ _ <<<"$job"
  if [ ! "$RUNS/$name/results.json" -nt "$stamp" ] && [ -f "$RUNS/$name/checkpoints/best.pt" ]; then
    timeout 90 $PY -m fewshot.eval checkpoint="$RUNS/$name/checkpoints/best.pt" device="$DEVICE" \
      hydra.run.dir="$RUNS/$name/eval_best" >"$RUNS/${name}_eval.log" 2>&1
  fi
done
for job in "${JOBS[@]}"; do
  IFS='|' read -r name _ _ <<<"$job"
  printf '%-32s %s\n' "$name" "$(grep -h -A3 '^| algo' "$RUNS/$name/results.md" 2>/dev/null | tail -1 || true)"
  tail -c 600 "$RUNS/$name.log" | tr '\r' '\n' | tail -3
done
(cd "$RUNS" && tar czf - *.log $(ls -d */results.json */results.md */metrics.csv */.hydra */eval_best/results.json \
  2>/dev/null)) >"$OUT/runs.tgz"
