#!/usr/bin/env bash
# The GPU figures the README quotes, one phase per call so that each fits a short slot on a node:
#
#   bash bench/gpu_checks.sh PHASES [TOKENIZERS]     PHASES: decode | train | pipeline | tests | all,
#                                                    or several joined by commas (pipeline,tests)
#
# `all` runs the four in that order (the figures first). Several phases go on past a failed one,
# and each one's outcome and wall time is appended to bench/results/gpu_checks-times.log as it
# ends: a node lent for a few minutes may cut the run short, and the next call needs to know which
# phases are left and how long they take.
# On one CUDA GPU (H100/H200 class), with the project and its dependencies importable (plus
# `pip install --no-deps trl==1.16.0 pytest` for `train` and `tests`). The node needs neither the
# hub nor the embedded weights: `decode` uses random weights, and `train` and `pipeline` build
# random-weight SmolLM2-135M / MiniLM-L6 stand-ins from the real tokenizers, which
# `python bench/random_model.py --tokenizers DIR` saves where the embedded packages are installed
# (TOKENIZERS, default bench/tokenizers). Output: bench/results/*.json and the logs in
# bench/results/gpu_checks-PHASE.log.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
known=decode,train,pipeline,tests  # the phases, in the order `all` runs them (the figures first)
phases=${1:?give phases: ${known//,/ | } | all, or several joined by commas}
[[ $phases == all ]] && phases=$known
tokenizers=${2:-bench/tokenizers}
export RAY_USAGE_STATS_ENABLED=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
mkdir -p bench/results

stand_ins() {  # random-weight models with the real tokenizers
  for d in "$tokenizers/smollm2" "$tokenizers/minilm"; do
    [[ -f $d/tokenizer_config.json ]] || { echo "no tokenizer in $d: run bench/random_model.py --tokenizers" >&2; exit 2; }
  done
  $py bench/random_model.py smollm2-135m "$work/smollm2" --tokenizer "$tokenizers/smollm2" --dtype bfloat16 >/dev/null
  $py bench/random_model.py minilm-l6 "$work/minilm" --tokenizer "$tokenizers/minilm" >/dev/null
}

run_phase() {
  case $1 in
    tests)  # the unit and end-to-end paths on CUDA (tests/test_gpu.py)
      $py -m pytest -m gpu -q -rs tests/test_gpu.py ;;
    decode)  # K=3 ensemble vs one adapter (eager and static cache + compile) vs the reference loop
      # graph: every column; eager: (a) and (b) only, since (a'), (c) and their compiles are the same
      $py bench/ensemble_decode.py --model random:llama-1b --device cuda --dtype bfloat16 --batches 16,64 \
        --decode-step graph
      cp bench/results/ensemble_decode-random_llama-1b-cuda.json bench/results/ensemble_decode-llama-1b-cuda-graph.json
      $py bench/ensemble_decode.py --model random:llama-1b --device cuda --dtype bfloat16 --batches 16,64 \
        --decode-step eager --skip-reference --no-compiled-single
      cp bench/results/ensemble_decode-random_llama-1b-cuda.json bench/results/ensemble_decode-llama-1b-cuda-eager.json ;;
    train)  # the k-SCST step (rollouts as replayed graphs) against TRL's RLOOTrainer on the SmolLM2 shape
      stand_ins
      $py bench/train_throughput.py --model "$work/smollm2" --device cuda --batch 16 --k 4 --max-new-tokens 64 \
        --steps 6 --warmup 2 --decode-step graph ;;
    pipeline)  # the main job on one GPU: configs/gpu_one_node.yaml with the stand-ins, shortened
      stand_ins
      time $py jobs/train_all.py --config configs/gpu_one_node.yaml --output-dir "$work/runs" \
        --set model.id="$work/smollm2" --set objectives.reflection.scorer.model="$work/minilm" \
        --set objectives.empathy.scorer.model="$work/minilm" --set training.max_steps=20 \
        --set search.levels=2 ;;
  esac
}

for p in ${phases//,/ }; do  # every name checked before the first phase starts
  [[ ,$known, == *,"$p",* ]] || { echo "unknown phase $p: ${known//,/ | } | all" >&2; exit 2; }
done
if [[ $phases == *,* ]]; then  # each phase in a shell of its own, which its first failed command ends
  failed=0
  for p in ${phases//,/ }; do bash "$self" "$p" "$tokenizers" || failed=1; done
  exit $failed
fi
work=$(mktemp -d)  # the phase's stand-in models and run directory
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
start=$SECONDS
set +e
( set -e; run_phase "$phases" ) 2>&1 | tee "bench/results/gpu_checks-$phases.log"
rc=$?
echo "phase $phases: $([[ $rc == 0 ]] && echo ok || echo "failed ($rc)") in $((SECONDS - start)) s" |
  tee -a bench/results/gpu_checks-times.log
exit $rc
