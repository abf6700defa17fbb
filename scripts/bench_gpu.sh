#!/usr/bin/env bash
# One prepared GPU check, printing JSON lines (under 6 minutes on an H100 without FULL=1):
#   1. the CUDA tests (-k cuda: captured graph vs eager step, vmap's meta-gradient vs learn2learn's on CUDA);
#   2. scripts/bench_maml.py --device cuda: learn2learn vs our eager step vs our CUDA-graph step (trainer.cuda_graph=on),
#      same process, same tasks: ms per meta-iteration, speedups, peak memory; at 1 and 15 queries per class, with
#      the graph step's variants (--variants), kernel profiles (--profile) and cuDNN's benchmark mode;
#   3. a timed maml_omniglot_5w1s run with trainer.cuda_graph=on: ITERATIONS meta-iterations (default 3000), its
#      test, and the ms per meta-iteration projected to the paper's 60,000. FULL=1: the whole preset (60,000
#      iterations, 600 test tasks); a run stopped by its time limit (RUN_LIMIT seconds, SIGTERM) checkpoints and the
#      same command resumes it (the run folder is $OUT/maml_omniglot_5w1s, or RUN_DIR). EVAL_GRAPH=1: its
#      validation and test as CUDA graphs too (eval.cuda_graph=true);
#   4. once the run has finished: fewshot-eval of its best.pt with eval.cuda_graph false and true, timed (JSON).
#
# Prepare on the CPU machine, in the project's root (see ../shared/docs/gpu.md):
#   ../shared/tools/device-wheels.sh                                  # hydra, learn2learn, ... wheels in .whl/
#   .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl . && rm -rf build    # fewshot itself
#   mkdir -p .devdata/omniglot && cp -r ../shared/data/omniglot/* .devdata/omniglot/
# then run on the device, carrying [".whl", ".devdata"]:   bash scripts/bench_gpu.sh   (FULL=1 ... for the cell)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/bench_gpu}
FULL=${FULL:-0}
ITERATIONS=${ITERATIONS:-3000}
RUN_LIMIT=${RUN_LIMIT:-560}
RUN_DIR=${RUN_DIR:-$OUT/maml_omniglot_5w1s}
SKIP_BENCH=${SKIP_BENCH:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export FEWSHOT_DATA_ROOT=${FEWSHOT_DATA_ROOT:-$PWD/.devdata}
export FEWSHOT_CACHE_DIR=${FEWSHOT_CACHE_DIR:-/tmp/fewshot-cache}
if ! python3 -c "import hydra, learn2learn, fewshot.engine.steps" 2>/dev/null; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "$SKIP_BENCH" != 1 ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_steps.py tests/test_algorithms.py -k cuda 2>&1 \
    | tail -5 | tee "$OUT/tests.txt"
  # 1 query per class (the presets: MAML's own code draws queries = shots) and 15 (the issue's bench); the graph
  # step's variants, kernel profiles at 1 query; cuDNN's benchmark mode in processes of its own.
  for q in 1 15; do
    extra=(--variants); [ "$q" = 1 ] && extra+=(--profile)
    timeout 150 python3 scripts/bench_maml.py --device cuda --queries "$q" --iters 10 --warmup 3 --block 5 \
      "${extra[@]}" >"$OUT/bench_maml_q$q.log" 2>&1; grep '^{' "$OUT/bench_maml_q$q.log"
    timeout 90 python3 scripts/bench_maml.py --device cuda --queries "$q" --iters 5 --warmup 2 --block 5 \
      --cudnn-benchmark >"$OUT/bench_maml_q${q}_cudnn_benchmark.log" 2>&1
    grep '^{' "$OUT/bench_maml_q${q}_cudnn_benchmark.log"
  done
fi
if [ "$FULL" = 1 ]; then
  budget=()
else
  budget=("trainer.iterations=$ITERATIONS" trainer.val_every=1000 trainer.checkpoint_every=1000)
fi
start=$(date +%s.%N)
timeout -s TERM -k 30 "$RUN_LIMIT" python3 -m fewshot.train experiment=maml_omniglot_5w1s device=cuda seed=1 \
  trainer.cuda_graph=on "eval.cuda_graph=$([ "${EVAL_GRAPH:-0}" = 1 ] && echo true || echo false)" \
  "${budget[@]}" "hydra.run.dir=$RUN_DIR" 2>&1 \
  | tr '\r' '\n' | grep -v '^meta-train\|^validate\|^test' | tee -a "$OUT/train.log" | tail -20
end=$(date +%s.%N)
python3 - "$RUN_DIR" "$start" "$end" <<'PY'
import json, os, sys
run, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
path = f"{run}/results.json"
if not os.path.exists(path):
    print(json.dumps({"run": "maml_omniglot_5w1s", "finished": False, "wall_seconds_this_call": round(end - start, 1)}))
    sys.exit(0)
r = json.load(open(path))
iters = r["iterations"]
ms = 1000 * r["train_seconds"] / iters
print(json.dumps({"run": "maml_omniglot_5w1s", "finished": True, "device": r.get("device"), "iterations": iters,
                  "train_seconds": round(r["train_seconds"], 1), "train_ms_per_iter": round(ms, 2),
                  "projected_60k_minutes": round(ms * 60000 / 1000 / 60, 1),
                  "wall_seconds_this_call": round(end - start, 1),
                  "test_acc": round(100 * r["test"]["acc_mean"], 2), "test_ci95": round(100 * r["test"]["acc_ci95"], 2),
                  "test_episodes": r["test"]["episodes"]}))
PY
if [ -f "$RUN_DIR/checkpoints/best.pt" ] && [ -f "$RUN_DIR/results.json" ]; then
  for graph in false true false true; do
    s=$(date +%s.%N)
    timeout 120 python3 -m fewshot.eval "checkpoint=$RUN_DIR/checkpoints/best.pt" device=cuda "eval.cuda_graph=$graph" \
      "hydra.run.dir=$OUT/eval_$graph" >/dev/null 2>"$OUT/eval_$graph.err"
    python3 - "$OUT/eval_$graph/results.json" "$graph" "$s" "$(date +%s.%N)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({"fewshot_eval": "maml_omniglot_5w1s best.pt", "eval_cuda_graph": sys.argv[2] == "true",
                  "episodes": r["test"]["episodes"], "test_acc": round(100 * r["test"]["acc_mean"], 3),
                  "wall_seconds": round(float(sys.argv[4]) - float(sys.argv[3]), 1)}))
PY
  done
fi
