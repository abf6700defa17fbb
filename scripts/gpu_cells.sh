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
# over several leases. A job its limit stopped (it checkpointed on SIGTERM) comes back as $OUT/resume_<job>.tgz
# (its run folder: checkpoints, metrics.csv, log), packed as soon as it stops; the limits are cut to end 40 s before
# CALL_S (default 600), the device call's timeout_s. Before the next lease, on the CPU machine, add them to .devrun,
#   mkdir -p .devrun && cp <files_at>/resume_*.tgz .devrun/
# and carry .devrun too: RESUME=.devrun bash scripts/gpu_cells.sh JOB... resumes each job that has a resume file
# from its last checkpoint, with the same command, seed and overrides. Delete a job's file once it has finished (the
# script says so; a job that finished or failed leaves no new file, and files of jobs not run stay for later).
# results.json then names each kind of device, in order, that the cell trained on (train_devices). At most 7 jobs:
# $OUT brings back 8 files. EVAL_STOPPED=1 also tests a stopped job's best.pt (90 s each, after the jobs: set
# CALL_S lower), a reduced-budget number for a cell no later lease will finish.
# LOCAL=1 skips the wheel install (a dry run of the script itself with the local .venv, e.g. on CPU).
set -u
if [ -n "${RESUME:-}" ]; then  # as given, from where the script was called
  given=$RESUME
  RESUME=$(cd "$RESUME" 2>/dev/null && pwd) || { echo "gpu_cells.sh: RESUME=$given: no such folder" >&2; exit 2; }
fi
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

# The default jobs: the three cells RESULTS.md had at full budget until the MAML presets came to test their final
# weights (eval.weights=last, as cbfinn/maml; those runs tested best.pt), measured on an H100/H200 at 233 s (MAML
# 5-way 1-shot), 117 s (first-order 5-way 1-shot) and 486 s (first-order 5-way 5-shot) of training alone; run
# together they share the GPU, so one may need a second call (RESUME=.devrun, within the 30 s a warm machine
# waits). ProtoNets' 1-shot cells, which were here too, ran at full budget on the CPU machine (2026-11-28, RESULTS.md);
# in their place, the full-budget pair for the open question of MAML's inner step (below). The 20-way cells take 3 or
# more leases each (20w1s: 26.6 ms x 60,000 on an H100).
# .devrun is git-ignored: a new checkout starts without it, so plan a cell's leases within one session.
# A limit of 540 s is cut to what the call leaves (CALL_S).
JOBS=(
  "maml_omniglot_5w1s|540|experiment=maml_omniglot_5w1s"
  "fomaml_omniglot_5w1s|540|experiment=fomaml_omniglot_5w1s"
  "fomaml_omniglot_5w5s|540|experiment=fomaml_omniglot_5w5s"
  # The open question of MAML's inner step (its presets step alpha on the mean loss; cbfinn/maml's sum over the
  # support makes that alpha*N, 2.0 on Omniglot): a full-budget pair, named apart so the ledger files the variant as
  # modified.
  "maml_omniglot_5w1s_alphaN|540|experiment=maml_omniglot_5w1s algo.inner_lr=2.0 name=maml_omniglot_5w1s_alphaN"
  "fomaml_omniglot_5w1s_alphaN|540|experiment=fomaml_omniglot_5w1s algo.inner_lr=2.0 name=fomaml_omniglot_5w1s_alphaN"
)
[ $# -gt 0 ] && JOBS=("$@")

names=()
for job in "${JOBS[@]}"; do
  IFS='|' read -r name _ _ <<<"$job"
  # $OUT brings back at most 8 files, named in letters, digits, '.', '_' and '-': runs.tgz and 7 resume files.
  [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] \
    || { echo "gpu_cells.sh: job name '$name': use letters, digits, . _ -" >&2; exit 2; }
  names+=("$name")
done
[ ${#names[@]} -le 7 ] || { echo "gpu_cells.sh: ${#names[@]} jobs; at most 7 (8 files come back)" >&2; exit 2; }
if [ -n "${RESUME:-}" ]; then
  for f in "$RESUME"/resume_*.tgz; do
    [ -e "$f" ] || continue
    n=${f##*/resume_}; n=${n%.tgz}
    case " ${names[*]} " in *" $n "*) ;; *) echo "$n: not a job of this call; keep $f for a later lease" ;; esac
  done
fi

# Decode Omniglot into the cache once, before the jobs start reading it.
timeout 120 $PY -c "
import os
from fewshot.data.omniglot import load_omniglot_images
load_omniglot_images(os.environ['FEWSHOT_DATA_ROOT'] + '/omniglot', os.environ['FEWSHOT_CACHE_DIR'])
" || echo "cache warm-up failed; each job decodes on its own"

start=$SECONDS
ready=()
for job in "${JOBS[@]}"; do
  IFS='|' read -r name _ _ <<<"$job"
  # A fresh folder per call: an old last.pt there would be resumed instead of starting the cell anew (or instead
  # of the resume file's, which is newer than anything a warm machine kept).
  [ -e "$RUNS/$name" ] && mv "$RUNS/$name" "$RUNS/$name.$(date +%s).old"
  [ -e "$RUNS/$name.log" ] && mv "$RUNS/$name.log" "$RUNS/$name.log.$(date +%s).old"
  if [ -n "${RESUME:-}" ] && [ -f "$RESUME/resume_$name.tgz" ]; then
    if ! tar xzf "$RESUME/resume_$name.tgz" -C "$RUNS"; then
      echo "$name: $RESUME/resume_$name.tgz cannot be unpacked; not run (the file is kept)"
      continue
    fi
    echo "$name: resuming from $(cd "$RUNS/$name/checkpoints" && echo *)"
  elif [ -n "${RESUME:-}" ]; then
    echo "$name: no resume_$name.tgz in $RESUME; starting anew"
  fi
  rm -f "$OUT/resume_$name.tgz"  # an earlier call's (a local OUT outlives calls), unpacked by now if RESUME=OUT
  ready+=("$job")
done

resumable() { [ -f "$1/last.pt" ] || [ -f "$1/previous.pt" ]; }  # what fewshot-train resumes from

run_job() {  # name limit overrides: train under the limit; a job it stopped is packed for RESUME at once
  local name=$1 limit=$2 overrides=$3 rc
  # shellcheck disable=SC2086  # the overrides are words
  timeout "$limit" $PY -m fewshot.train $overrides seed="$SEED" device="$DEVICE" hydra.run.dir="$RUNS/$name" \
    >>"$RUNS/$name.log" 2>&1  # a resumed job's log goes on
  rc=$?
  if [ "$rc" = 0 ]; then
    echo "$name: finished after $(( SECONDS - start )) s$([ -n "${RESUME:-}" ] && [ -f "$RESUME/resume_$name.tgz" ] \
      && echo "; delete its resume_$name.tgz on the CPU machine")"
  elif [ "$rc" = 124 ] && resumable "$RUNS/$name/checkpoints"; then
    # Stopped by the limit (SIGTERM: it checkpointed): the whole run folder and log, for RESUME in the next lease.
    (cd "$RUNS" && tar czf - --exclude=eval_best "$name" "$name.log") >"$OUT/resume_$name.tgz.part" \
      && mv "$OUT/resume_$name.tgz.part" "$OUT/resume_$name.tgz"
    echo "$name: $(tail -c 3000 "$RUNS/$name.log" | tr '\r' '\n' | grep -o 'SIGTERM [^:]*' | tail -1); resume_$name.tgz"
  else
    echo "$name: failed (exit $rc) after $(( SECONDS - start )) s: read $name.log (runs.tgz) before running it again"
  fi
}

# Every job ends in time for its resume file: CALL_S is the device call's timeout_s (the margin packs and returns).
for job in "${ready[@]}"; do
  IFS='|' read -r name limit overrides <<<"$job"
  left=$(( ${CALL_S:-600} - 40 - SECONDS ))
  [ "$limit" -gt "$left" ] && { echo "$name: limit $limit s cut to $left s (CALL_S=${CALL_S:-600})"; limit=$left; }
  run_job "$name" "$(( limit > 1 ? limit : 1 ))" "$overrides" &
done
wait
echo "all jobs ended after $(( SECONDS - start )) s"
# EVAL_STOPPED=1: test a stopped job's best checkpoint, a reduced budget kept apart from the full cells.
for job in "${ready[@]}"; do
  IFS='|' read -r name _ _ <<<"$job"
  if [ "${EVAL_STOPPED:-0}" = 1 ] && [ -f "$OUT/resume_$name.tgz" ] && [ -f "$RUNS/$name/checkpoints/best.pt" ]; then
    timeout 90 $PY -m fewshot.eval checkpoint="$RUNS/$name/checkpoints/best.pt" device="$DEVICE" \
      hydra.run.dir="$RUNS/$name/eval_best" >"$RUNS/${name}_eval.log" 2>&1
  fi
done
files=()
for job in "${ready[@]}"; do
  IFS='|' read -r name _ _ <<<"$job"
  printf '%-32s %s\n' "$name" "$(grep -h -A3 '^| algo' "$RUNS/$name/results.md" 2>/dev/null | tail -1 || true)"
  tail -c 600 "$RUNS/$name.log" | tr '\r' '\n' | tail -3
  for f in "$name.log" "${name}_eval.log" "$name/results.json" "$name/results.md" "$name/metrics.csv" "$name/.hydra" \
    "$name/eval_best/results.json"; do
    [ -e "$RUNS/$f" ] && files+=("$f")
  done
done
[ ${#files[@]} -gt 0 ] && (cd "$RUNS" && tar czf - "${files[@]}") >"$OUT/runs.tgz"
