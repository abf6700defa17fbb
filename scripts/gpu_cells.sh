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
#
# A cell longer than one lease (MAML 20w1s: 60,000 x 26.6 ms on an H100; a lease gives about 9 minutes) goes on
# over several leases: every job stopped by its limit also comes back as $OUT/resume_<job>.tgz (its run folder:
# checkpoints, metrics.csv, log). Before the next lease, on the CPU machine, replace .devrun with the ones that came
# back,
#   rm -rf .devrun && mkdir .devrun && cp <files_at>/resume_*.tgz .devrun/
# and carry .devrun too: RESUME=.devrun bash scripts/gpu_cells.sh JOB... resumes each job that has a resume file
# from its last checkpoint, the same command, seed and overrides (a job that finished leaves no resume file).
# results.json then names every GPU the cell trained on (train_devices). $OUT brings back at most 8 files: runs.tgz
# and 7 resume files. EVAL_STOPPED=1 also tests a stopped job's best.pt (90 s each, after the jobs: shorten their
# limits), a reduced-budget number for a cell no later lease will finish.
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

# The cells RESULTS.md still lacks that need a GPU, 5-way 5-shot first: untimed (five times 5w1s's images; 5w1s
# took 3.6 ms a meta-iteration on an H100). The 20-way ones take 3 or more leases each (20w1s: 26.6 ms x 60,000
# on an H100); pass them as arguments, with RESUME= from the second lease on. Limits of 510 s leave the install,
# the cache warm-up and the packing room in a 600 s call.
JOBS=(
  "maml_omniglot_5w5s|510|experiment=maml_omniglot_5w5s"
  "fomaml_omniglot_5w5s|510|experiment=fomaml_omniglot_5w5s"
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
  # A fresh folder per call: an old last.pt there would be resumed instead of starting the cell anew (or instead
  # of the resume file's, which is newer than anything a warm machine kept).
  [ -e "$RUNS/$name" ] && mv "$RUNS/$name" "$RUNS/$name.$(date +%s).old"
  [ -e "$RUNS/$name.log" ] && mv "$RUNS/$name.log" "$RUNS/$name.$(date +%s).old.log"
  if [ -n "${RESUME:-}" ] && [ -f "$RESUME/resume_$name.tgz" ]; then
    tar xzf "$RESUME/resume_$name.tgz" -C "$RUNS" || exit 1
    echo "$name: resuming from $(ls "$RUNS/$name/checkpoints/")"
  fi
done
for job in "${JOBS[@]}"; do
  IFS='|' read -r name limit overrides <<<"$job"
  # shellcheck disable=SC2086  # the overrides are words
  timeout "$limit" $PY -m fewshot.train $overrides seed="$SEED" device="$DEVICE" hydra.run.dir="$RUNS/$name" \
    >>"$RUNS/$name.log" 2>&1 &  # a resumed job's log goes on
done
wait
echo "all jobs ended after $(( $(date +%s) - start )) s"
# A job stopped by its time limit checkpointed on SIGTERM: test its best checkpoint so its numbers are not lost
# (a reduced budget, kept apart from the full cells).
for job in "${JOBS[@]}"; do
  IFS='|' read -r name _ _ <<<"$job"
  if [ "${EVAL_STOPPED:-0}" = 1 ] && [ ! "$RUNS/$name/results.json" -nt "$stamp" ] \
    && [ -f "$RUNS/$name/checkpoints/best.pt" ]; then
    timeout 90 $PY -m fewshot.eval checkpoint="$RUNS/$name/checkpoints/best.pt" device="$DEVICE" \
      hydra.run.dir="$RUNS/$name/eval_best" >"$RUNS/${name}_eval.log" 2>&1
  fi
done
for job in "${JOBS[@]}"; do
  IFS='|' read -r name _ _ <<<"$job"
  printf '%-32s %s\n' "$name" "$(grep -h -A3 '^| algo' "$RUNS/$name/results.md" 2>/dev/null | tail -1 || true)"
  tail -c 600 "$RUNS/$name.log" | tr '\r' '\n' | tail -3
done
# A job stopped before its results: its whole run folder and log, for RESUME in the next lease (previous.pt, the
# fallback for an unreadable last.pt, stays behind: last.pt was written whole, atomically).
for job in "${JOBS[@]}"; do
  IFS='|' read -r name _ _ <<<"$job"
  if [ ! "$RUNS/$name/results.json" -nt "$stamp" ] && [ -f "$RUNS/$name/checkpoints/last.pt" ]; then
    (cd "$RUNS" && tar czf - --exclude=previous.pt --exclude=eval_best "$name" "$name.log") >"$OUT/resume_$name.tgz"
    at=$($PY -c "import sys; from fewshot.checkpoint import load_checkpoint as l; print(l(sys.argv[1])['iteration'])" \
      "$RUNS/$name/checkpoints/last.pt" 2>/dev/null)
    echo "$name: stopped at iteration ${at:-?}; $OUT/resume_$name.tgz resumes it (RESUME=)"
  fi
done
(cd "$RUNS" && tar czf - *.log $(ls -d */results.json */results.md */metrics.csv */.hydra */eval_best/results.json \
  2>/dev/null)) >"$OUT/runs.tgz"
