#!/usr/bin/env bash
# The evidence behind the built-in SmolLM2-135M-Instruct recipes, in one run on one GPU, fp32:
# every calibration at the papers' budgets, then every evaluation on the full test splits.
#
#   bash benchmarks/evidence/gpu.sh              from the repository root; data at $DATA (../shared/data)
#   SMOKE=1 bash benchmarks/evidence/gpu.sh      tiny budgets on the CPU: checks the script, not the model
#
# Budgets: ZeroTuning (accuracy and entropy) and ACT on SST-2, AGNews and TREC draw 1280 train
# examples (1024 searched, 256 held out: `attnedit calibrate --holdout 0.2`, the default; ACT screens
# single heads on 256 of the 1024 and judges the combination of the 24 best on all 1024); CB and RTE
# draw all their train examples; PH3 all LAMA conflicts of the train relations; Colored Objects all
# of its train part. Evaluation: the whole test split of each task.
# Calibrated recipes go to $R/recipes/<name>.yaml (`name:` set to the file name), eval runs to
# $R/<run>/, each lane's log to $R/logs/. Lanes run in parallel, JOBS at a time; a step whose
# output exists is skipped, so an interrupted run resumes.
set -uo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data}
R=${R:-benchmarks/results/evidence}
T=benchmarks/evidence/tasks
RC=$R/recipes
JOBS=${JOBS:-8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1

if [ -n "${SMOKE:-}" ]; then  # every command once, on a few examples and candidates
  BIG=20 CB=20 RTE=20 PH3=200 COLORED=20 MAXC="--max-candidates 3" EVAL="--limit 4" DEV="--device cpu"
else
  BIG=1280 CB=250 RTE=2490 PH3=5566 COLORED=400 MAXC="" EVAL="" DEV=""
fi
B=${BACKEND:+--backend $BACKEND}  # BACKEND=reference: the PyTorch kernels instead of Triton
CAL="--data-dir $DATA --dtype float32 --batch-size 128 $DEV $MAXC $B"
EV="--data-dir $DATA --dtype float32 --batch-size 64 $DEV $EVAL $B"

step() {  # step OUTPUT COMMAND...: run COMMAND unless OUTPUT exists
  local out=$1; shift
  if [ -e "$out" ]; then echo "skip (exists): $out"; return 0; fi
  echo "+ $*"
  local t0=$SECONDS
  "$@" || { echo "FAILED ($?) after $((SECONDS - t0)) s: $out"; return 1; }
  echo "  done in $((SECONDS - t0)) s: $out"
}

cal() {  # cal NAME SOURCE TASK LIMIT [calibrate options]: a calibrated recipe named NAME
  local name=$1 src=$2 task=$3 limit=$4; shift 4
  step "$RC/$name.yaml" attnedit calibrate "$src" --task "$task" --limit "$limit" $CAL --out "$RC/$name.yaml" "$@" &&
    sed -i "0,/^name: .*/s//name: $name/" "$RC/$name.yaml"
}

ev() {  # ev NAME RUN TASKS: evaluate recipe NAME on TASKS into $R/RUN (nothing to do for an empty recipe)
  local name=$1 run=$2 tasks=$3 file=$RC/$1.yaml
  [ -e "$file" ] || { echo "no recipe $file: nothing to evaluate"; return 0; }
  if ! python3 -c "import sys, yaml; sys.exit(0 if (yaml.safe_load(open('$file')) or {}).get('interventions') else 1)"; then
    echo "$file is empty (the search kept nothing): nothing to evaluate"; return 0
  fi
  step "$R/$run/results.json" attnedit eval "$file" --tasks "$tasks" $EV --out "$R/$run"
}

lane_act() {  # act TASK [LIMIT [SCREEN]]: ACT's per-head search, heads screened alone on SCREEN (256) examples,
  # combined greedily on all the searched ones (LIMIT drawn, default $BIG; 20% held out)
  local task=$1 limit=${2:-$BIG} screen=${3:-256}
  cal "act-$task" act-paper "$task" "$limit" --param screen="$screen" --param combine=24
  ev "act-$task" "act-$task" "$task"
}

lane_zt() {  # ZeroTuning supervised (accuracy), then unsupervised (entropy) unless UNSUP=0
  local task=$1 limit=$2 unsup=${3:-1}
  cal "zerotuning-$task" zerotuning-paper "$task" "$limit"
  ev "zerotuning-$task" "zerotuning-$task" "$task"
  [ "$unsup" = 1 ] || return 0
  cal "zerotuning-unsup-$task" zerotuning-paper "$task" "$limit" --objective entropy
  ev "zerotuning-unsup-$task" "zerotuning-unsup-$task" "$task"
}

lane_ph3() {  # PH3: prune k memory heads, found on the train relations' conflicts
  local k=$1 name=ph3-context-smollm2
  [ "$k" = 5 ] || name=ph3-context-k$k-smollm2
  cal "$name" ph3-search "$T/lama-conflict-train.yaml" "$PH3" --param prune=memory --param k="$k" --param batch_size=64
  ev "$name" "${name%-smollm2}-facts" facts-conflict,facts-recall
  ev "$name" "${name%-smollm2}" "$T/lama-conflict-other.yaml,$T/lama-recall-other.yaml"
  ev "$name" "${name%-smollm2}-bigbench" bigbench:contextual_parametric_knowledge_conflicts
}

lane_colored() {  # BIG-bench Colored Objects: ZeroTuning's and ACT's searches on its train part
  local task=bigbench:reasoning_about_colored_objects
  cal zerotuning-colored-objects zerotuning-paper "$task" "$COLORED"
  ev zerotuning-colored-objects zerotuning-colored-objects "$task"
  cal act-colored-objects act-paper "$task" "$COLORED" --param screen=160 --param combine=24
  ev act-colored-objects act-colored-objects "$task"
}

lane_colored_paper() {  # Colored Objects: the built-in zerotuning-paper (gamma 2, all heads) on the whole test part
  local task=bigbench:reasoning_about_colored_objects
  step "$R/zerotuning-paper-colored-objects/results.json" attnedit eval zerotuning-paper --tasks "$task" $EV \
    --out "$R/zerotuning-paper-colored-objects"
}

lane_colored_wide() {  # Colored Objects: ZeroTuning's search with a wider gamma grid (the first search's
  # all-heads scores still rose at gamma 4, the grid's end)
  local task=bigbench:reasoning_about_colored_objects
  cal zerotuning-wide-colored-objects zerotuning-paper "$task" "$COLORED" --param gammas=1.5,2,3,4,6,8
  ev zerotuning-wide-colored-objects zerotuning-wide-colored-objects "$task"
}

lane_bigbench() {  # the other BIG-bench tasks in $DATA, whole test parts: the built-in, uncalibrated zerotuning-paper
  # (gamma 2 on every head), the one recipe not tied to a task
  local tasks=bigbench:navigate,bigbench:winowhy,bigbench:social_iqa,bigbench:date_understanding
  tasks=$tasks,bigbench:disambiguation_qa,bigbench:implicatures,bigbench:epistemic_reasoning
  step "$R/zerotuning-paper-bigbench/results.json" attnedit eval zerotuning-paper --tasks "$tasks" $EV \
    --out "$R/zerotuning-paper-bigbench"
}

lane_colored_lp() {  # Colored Objects: ZeroTuning's search judged by the gold answer's mean log-probability
  # (--objective logprob): a continuous score, where accuracy on 320 examples moves in steps of 0.3 points
  # and chose heads on one example's difference. PROFILE: head (default) or layer.
  local task=bigbench:reasoning_about_colored_objects profile=${1:-head} name=zerotuning-lp-colored-objects
  [ "$profile" = head ] || name=zerotuning-lp-$profile-colored-objects
  cal "$name" zerotuning-paper "$task" "$COLORED" --objective logprob --param profile="$profile"
  ev "$name" "$name" "$task"
}

# in order of priority: with JOBS lanes at a time, the first ones finish first
LANES=${LANES:-"zt:sst2:$BIG act:sst2 zt:agnews:$BIG ph3:10 zt:trec:$BIG:0 colored colored_lp:layer zt:cb:$CB zt:rte:$RTE act:agnews ph3:20 ph3:5 act:trec bigbench"}
for lane in $LANES; do  # a misspelt lane stops the run here, before the model is loaded
  declare -F "lane_${lane%%:*}" >/dev/null || {
    echo "gpu.sh: unknown lane '$lane' in LANES; lanes: $(declare -F | sed -n 's/^declare -f lane_//p' | tr '\n' ' ')" >&2
    exit 2
  }
done
mkdir -p "$R/logs" "$RC"

(command -v nvidia-smi >/dev/null && nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)") | tee "$R/logs/device.txt"
echo "+ warm-up: convert and cache the default model once"
python3 -c "import attnedit; attnedit.load('smollm2-135m-instruct', dtype='float32'${SMOKE:+, device='cpu'})" || exit 1
NGPU=$( (nvidia-smi -L 2>/dev/null || true) | grep -c "^GPU")
start=$SECONDS i=0
for lane in $LANES; do  # with several GPUs, lane i runs on GPU i mod NGPU
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  IFS=: read -r fn a b c <<< "$lane"
  log="$R/logs/${lane//:/-}.log"
  gpu=$([ "$NGPU" -gt 0 ] && echo $((i % NGPU)) || echo "")
  ( [ -n "$gpu" ] && export CUDA_VISIBLE_DEVICES=$gpu
    t0=$SECONDS; "lane_$fn" $a $b $c; echo "lane $lane: $((SECONDS - t0)) s${gpu:+ on GPU $gpu}" ) > "$log" 2>&1 &
  i=$((i + 1))
done
wait
echo "all lanes: $((SECONDS - start)) s"
grep -h "FAILED\|^lane " "$R"/logs/*.log
