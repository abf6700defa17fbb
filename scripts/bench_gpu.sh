#!/usr/bin/env bash
# One prepared GPU check, printing JSON lines. STEPS (default "tests bench run") picks and orders the steps; on an
# H200 (2026-11-26) tests took 36 s and bench 314 s with the 8 variants there were (there are 10 now):
#   tests: the CUDA tests (-k cuda: captured graph vs eager step, vmap's meta-gradient vs learn2learn's on CUDA,
#      Meta-SGD's, the replayed ensemble test, samplers' states across devices), whole output in $OUT/tests.txt;
#   descendants (not in the default STEPS): scripts/bench_descendants.py and bench_reptile.py --device cuda
#      (Meta-SGD, MAML++; Reptile's per-tensor inner Adam against torch.optim.Adam's loop and foreach forms;
#      Reptile's test, its tasks side by side under vmap, against them in turn: bench_reptile.py --test);
#   layout (not in the default STEPS): scripts/bench_channels_last.py --device cuda for ProtoNets, Reptile,
#      Matching Networks and ANIL, whose CPU steps NHWC speeds: what device.channels_last=null should do on CUDA;
#   bench: scripts/bench_maml.py --device cuda: learn2learn vs our eager step vs our CUDA-graph step
#      (trainer.cuda_graph=on), same process, same tasks: ms per meta-iteration, speedups, step memory; at 1 query
#      per class (the presets: MAML's own code draws queries = shots) and 15 (the issue's bench), with the graph
#      step's variants (--variants; VARIANTS="a b" times only those) and kernel profiles (--profile at 1 query),
#      under cuDNN's benchmark mode (as the graph step runs), then at 1 query without it (cuDNN keeps the first
#      algorithm it picks per shape, so a process times one mode); the logs in $OUT/bench.log;
#   run: a timed run of preset EXPERIMENT (default maml_omniglot_5w1s; seed SEED, default 1) with
#      trainer.cuda_graph=on: ITERATIONS meta-iterations (default 3000), its test, and the ms per meta-iteration
#      projected to the paper's 60,000. FULL=1: the whole preset (60,000
#      iterations, 600 test tasks); a run stopped by its time limit (RUN_LIMIT seconds, SIGTERM) checkpoints and the
#      same command resumes it (run folder RUN_DIR, default /tmp/fewshot_run; its results.json, metrics.csv and
#      overrides.yaml are copied to $OUT). EVAL_GRAPH=1: its validation and test as CUDA graphs too
#      (eval.cuda_graph=true). Once finished: fewshot-eval of its best.pt with eval.cuda_graph false and true, timed
#      (EVALS=0: not).
#
# Prepare on the CPU machine, in the project's root (see ../shared/docs/gpu.md):
#   ../shared/tools/device-wheels.sh                                  # hydra, learn2learn, ... wheels in .whl/
#   .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl . && rm -rf build    # fewshot itself
#   mkdir -p .devdata/omniglot && cp -r ../shared/data/omniglot/* .devdata/omniglot/
# then run on the device, carrying [".whl", ".devdata"]:   bash scripts/bench_gpu.sh   (FULL=1 ... for the cell)
# Every JSON line (bench, run, fewshot-eval, each step's wall seconds) is also appended to $OUT/bench.jsonl, which
# comes back when the call is cut. At most 8 files come back from $OUT: tests.txt, bench.jsonl, bench.log,
# train.log, results.json, metrics.csv, overrides.yaml.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/bench_gpu}
STEPS=${STEPS:-tests bench run}
FULL=${FULL:-0}
ITERATIONS=${ITERATIONS:-3000}
RUN_LIMIT=${RUN_LIMIT:-560}
RUN_DIR=${RUN_DIR:-/tmp/fewshot_run}
EXPERIMENT=${EXPERIMENT:-maml_omniglot_5w1s}
SEED=${SEED:-1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export FEWSHOT_DATA_ROOT=${FEWSHOT_DATA_ROOT:-$PWD/.devdata}
export FEWSHOT_CACHE_DIR=${FEWSHOT_CACHE_DIR:-/tmp/fewshot-cache}
if ! python3 -c "import hydra, learn2learn, fewshot.engine.steps" 2>/dev/null; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

tests() {
  timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_steps.py tests/test_algorithms.py \
    tests/test_meta_sgd.py tests/test_ensemble.py tests/test_sampler.py -k cuda >"$OUT/tests.txt" 2>&1
  tail -3 "$OUT/tests.txt"
}

descendants() {  # Meta-SGD vs learn2learn, MAML++ (MSL and after it; loop, vmap, graph) vs MAML 5 steps; Reptile
  local args
  for args in bench_descendants.py bench_reptile.py "bench_reptile.py --test"; do
    echo "== $args" >>"$OUT/bench.log"
    # shellcheck disable=SC2086  # the script's name and its flags, split at the space
    timeout 200 python3 scripts/$args --device cuda 2>&1 | tee -a "$OUT/bench.log" | grep '^{' \
      | tee -a "$OUT/bench.jsonl"
  done
}

layout() {  # NHWC against the default layout on CUDA (device.channels_last); errors are reported per preset
  echo "== bench_channels_last.py" >>"$OUT/bench.log"
  timeout 240 python3 scripts/bench_channels_last.py --device cuda protonet_omniglot_5w1s reptile_omniglot_5w1s \
    matching_omniglot_5w1s anil_omniglot_20w1s 2>&1 | tee -a "$OUT/bench.log" | grep '^{' | tee -a "$OUT/bench.jsonl"
}

bench_one() {  # bench_maml.py arguments; its JSON lines to stdout and bench.jsonl, everything to bench.log
  echo "== bench_maml.py $*" >>"$OUT/bench.log"
  timeout 240 python3 scripts/bench_maml.py --device cuda --iters 10 --warmup 3 --block 5 "$@" 2>&1 \
    | tee -a "$OUT/bench.log" | grep '^{' | tee -a "$OUT/bench.jsonl"
}

bench() {  # VARIANTS: the variants to time (default: all of them, about 5 minutes on an H200)
  # shellcheck disable=SC2086  # one word per variant
  bench_one --queries 1 --variants ${VARIANTS:-} --profile --cudnn-benchmark
  # shellcheck disable=SC2086
  bench_one --queries 15 --variants ${VARIANTS:-} --cudnn-benchmark
  bench_one --queries 1
}

run() {
  local budget=()
  [ "$FULL" = 1 ] || budget=("trainer.iterations=$ITERATIONS" trainer.val_every=1000 trainer.checkpoint_every=1000)
  local start end
  start=$(date +%s.%N)
  touch "$RUN_DIR.started"  # a results.json older than this is an earlier run's
  timeout -s TERM -k 30 "$RUN_LIMIT" python3 -m fewshot.train "experiment=$EXPERIMENT" device=cuda "seed=$SEED" \
    trainer.cuda_graph=on "eval.cuda_graph=$([ "${EVAL_GRAPH:-0}" = 1 ] && echo true || echo false)" \
    "${budget[@]}" "hydra.run.dir=$RUN_DIR" 2>&1 \
    | tr '\r' '\n' | grep -v '^meta-train\|^validate\|^test' | tee -a "$OUT/train.log" | tail -20
  end=$(date +%s.%N)
  for f in results.json metrics.csv .hydra/overrides.yaml; do  # this call's, not an earlier run's
    [ "$RUN_DIR/$f" -nt "$RUN_DIR.started" ] && cp "$RUN_DIR/$f" "$OUT/"
  done
  python3 - "$RUN_DIR" "$start" "$end" "$EXPERIMENT" <<'PY' | tee -a "$OUT/bench.jsonl"
import json, os, sys
run, start, end, name = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
path = f"{run}/results.json"
if not os.path.exists(path) or os.path.getmtime(path) < start:  # none, or an earlier run's (the run failed)
    print(json.dumps({"run": name, "finished": False, "wall_seconds_this_call": round(end - start, 1)}))
    sys.exit(0)
r = json.load(open(path))
iters = r["iterations"]
ms = 1000 * r["train_seconds"] / iters
print(json.dumps({"run": name, "finished": True, "device": r.get("device"), "iterations": iters,
                  "train_seconds": round(r["train_seconds"], 1), "train_ms_per_iter": round(ms, 2),
                  "val_seconds": r.get("val_seconds"), "test_seconds": r.get("test_seconds"),
                  "projected_60k_minutes": round(ms * 60000 / 1000 / 60, 1),
                  "wall_seconds_this_call": round(end - start, 1),
                  "test_acc": round(100 * r["test"]["acc_mean"], 2), "test_ci95": round(100 * r["test"]["acc_ci95"], 2),
                  "test_episodes": r["test"]["episodes"]}))
PY
  [ -f "$RUN_DIR/checkpoints/best.pt" ] && [ "$RUN_DIR/results.json" -nt "$RUN_DIR.started" ] && [ "${EVALS:-1}" = 1 ] \
    || return 0
  for graph in false true; do
    local s
    s=$(date +%s.%N)
    rm -f "/tmp/fewshot_eval_$graph/results.json"  # an earlier call's, on a warm machine
    timeout 120 python3 -m fewshot.eval "checkpoint=$RUN_DIR/checkpoints/best.pt" device=cuda "eval.cuda_graph=$graph" \
      "hydra.run.dir=/tmp/fewshot_eval_$graph" >/dev/null 2>"/tmp/fewshot_eval_$graph.err"
    python3 - "/tmp/fewshot_eval_$graph/results.json" "$graph" "$s" "$(date +%s.%N)" "$EXPERIMENT" <<'PY' | tee -a "$OUT/bench.jsonl"
import json, os, sys
if not os.path.exists(sys.argv[1]):
    print(json.dumps({"fewshot_eval": f"{sys.argv[5]} best.pt", "eval_cuda_graph": sys.argv[2] == "true", "failed": True}))
    sys.exit(0)
r = json.load(open(sys.argv[1]))
print(json.dumps({"fewshot_eval": f"{sys.argv[5]} best.pt", "eval_cuda_graph": sys.argv[2] == "true",
                  "episodes": r["test"]["episodes"], "test_acc": round(100 * r["test"]["acc_mean"], 3),
                  "test_seconds": r.get("test_seconds"),
                  "wall_seconds": round(float(sys.argv[4]) - float(sys.argv[3]), 1)}))
PY
  done
}

for step in $STEPS; do  # each step's wall time in bench.jsonl too: what is printed here is lost if the call is cut
  s=$(date +%s)
  "$step"
  echo "{\"step\": \"$step\", \"wall_seconds\": $(($(date +%s) - s))}" | tee -a "$OUT/bench.jsonl"
done
