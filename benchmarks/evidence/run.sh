#!/usr/bin/env bash
# Evidence on SmolLM2-135M-Instruct (CPU, fp32): calibrate on train splits, evaluate on test splits.
# A few lanes at CPU budgets (the reference kernels, a few hundred examples); the README's rows all
# come from benchmarks/evidence/gpu.sh, which runs every lane at the papers' budgets on a GPU.
#   bash benchmarks/evidence/run.sh LANE      (LANE: ph3 | ph3k | colored)
# Run from the repository root with the data folder at ../shared/data.
# Each step is skipped when its output exists, so an interrupted lane resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=benchmarks/results/evidence
T=benchmarks/evidence/tasks
mkdir -p "$R/logs"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

step() {  # step OUTPUT COMMAND...: run COMMAND unless OUTPUT exists
  local out=$1; shift
  if [ -e "$out" ]; then echo "skip (exists): $out"; return; fi
  echo "+ $*"
  local t0=$SECONDS
  "$@"
  echo "  done in $((SECONDS - t0)) s: $out"
}

lane=${1:?lane: ph3 | ph3k | colored}
case $lane in
ph3)  # PH3 heads on train relations; measured on the other relations and on BIG-bench conflicts
  step recipes/ph3-context-smollm2.yaml attnedit calibrate --data-dir ../shared/data ph3-search --task $T/lama-conflict-train.yaml --limit 256 \
       --param prune=memory --param k=5 --out recipes/ph3-context-smollm2.yaml
  step $R/ph3-context/results.json attnedit eval --data-dir ../shared/data recipes/ph3-context-smollm2.yaml \
       --tasks $T/lama-conflict-other.yaml,$T/lama-recall-other.yaml --limit 400 --out $R/ph3-context
  step $R/ph3-context-facts/results.json attnedit eval ph3-context-smollm2 --tasks facts-conflict,facts-recall \
       --out $R/ph3-context-facts
  step $R/ph3-context-bigbench/results.json attnedit eval --data-dir ../shared/data recipes/ph3-context-smollm2.yaml \
       --tasks bigbench:contextual_parametric_knowledge_conflicts --limit 200 --out $R/ph3-context-bigbench
  ;;
ph3k)  # PH3 pruning more memory heads (k = 10, 20): how far context-following goes, and what recall pays
  for k in 10 20; do
    step recipes/ph3-context-k$k-smollm2.yaml attnedit calibrate --data-dir ../shared/data ph3-search --task $T/lama-conflict-train.yaml \
         --limit 256 --param prune=memory --param k=$k --out recipes/ph3-context-k$k-smollm2.yaml
    step $R/ph3-context-k$k/results.json attnedit eval --data-dir ../shared/data recipes/ph3-context-k$k-smollm2.yaml \
         --tasks $T/lama-conflict-other.yaml,$T/lama-recall-other.yaml --limit 400 --out $R/ph3-context-k$k
    step $R/ph3-context-k$k-facts/results.json attnedit eval ph3-context-k$k-smollm2 --tasks facts-conflict,facts-recall \
         --out $R/ph3-context-k$k-facts
  done
  ;;
colored)  # BIG-bench Colored Objects (the circuit-reuse paper's task) under head-level edits
  step $R/colored-zerotuning-paper/results.json attnedit eval --data-dir ../shared/data zerotuning-paper \
       --tasks bigbench:reasoning_about_colored_objects --limit 100 --out $R/colored-zerotuning-paper
  step $R/colored-ph3-context/results.json attnedit eval --data-dir ../shared/data recipes/ph3-context-smollm2.yaml \
       --tasks bigbench:reasoning_about_colored_objects --limit 100 --out $R/colored-ph3-context
  ;;
*) echo "unknown lane $lane" >&2; exit 2;;
esac
