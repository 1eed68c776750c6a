#!/usr/bin/env bash
# Reproduce the paper's claims at CPU scale, with the paper's stream rates, batch limits and
# baseline, and its testbed's step and exchange times as a calibrated time model; store every
# run's compact record and regenerate docs/RESULTS.md from them.
#
#   bash execution_scripts/reproduce_cpu.sh            # full: 50 min on 2 CPU cores (32d5e2a)
#   QUICK=1 bash execution_scripts/reproduce_cpu.sh    # smoke run: a few minutes (records and
#                                                      # a results page under OUT)
#   OUT=/tmp/r ONLY=grid,window bash execution_scripts/reproduce_cpu.sh
#   OUT=/tmp/r REPORT_ONLY=1 bash execution_scripts/reproduce_cpu.sh   # store and report again
#
# Learning: smallcnn-bn (a small CNN with batch norm) on Fashion-MNIST (the paper: ResNet152 /
# VGG19-bn on CIFAR, far beyond two CPU cores). Time: a virtual clock charging each step the paper's K80 compute time
# (--compute-model paper-resnet152 | paper-vgg19: 1.2 s / 1.6 s at batch 64, the shape
# measured on the real models) and a ring allreduce (or, compressed, an allgather) of
# ResNet152's / VGG19's gradient on 5 Gbit/s Ethernet (--comm-model paper-ethernet).
#
# The comparisons (each a folder under OUT with its runs; records under RESULTS_DIR):
#   grid       the paper's Fig. 6 and Table VI: 16 IID devices, rates S1 / S2 / S10 / S20,
#              ResNet152 and VGG19 timing, four methods per cell and seed: ddp (batch 64,
#              persistence: the paper's DDL), fig6 (ScaDLES, weighted aggregation alone,
#              persistence, b_min 8, b_max 1024), full (truncation + adaptive Top-k, CR 0.1,
#              delta 0.3) and, not in the paper, bounded (fig6 with b_max 64, ddp's batch,
#              and --step-when-full). The runs of a cell and seed get the same stream-time budget:
#              GRID_DDP_STEPS of ddp's predicted step (scadles.predict), evaluated every
#              budget / GRID_EVALS stream seconds.
#   ablations  ddp with a batch of 16, ScaDLES with b_min 1 (ResNet152 timing, seed 0); at S10:
#              the lr cap at 0.2, and the model without batch norm (ddp, fig6, full).
#   window     the window under cheap compute (4 devices, S2, b_max 64, 50 ms + 2 ms per
#              sample): ddp, ScaDLES as the paper defines the window, and --step-when-full.
#   tablev     the paper's Table V: adaptive Top-k over delta x CR, 8 devices, S10, over Kafka.
#   clocks     a real-time run over the embedded Kafka broker (measured compute) and its
#              virtual-clock replay with the compute time fitted to it.
#   buffer     persistence against truncation on fast streams (S2, 8 devices, b_max 1024),
#              buffers unbounded so that persistence's backlog is measured.
#   inject     10 one-label devices without and with randomized data injection (over Kafka),
#              with batch norm (smallcnn-bn) and without (smallcnn), and the same devices on
#              IID partitions as the reference.
# Streams: in-process (the same records the producer sends) for grid, ablations, window and
# buffer (millions of records would not fit the embedded broker's memory); tablev, clocks and
# inject go through the real embedded Kafka broker.
#
# Every parameter below can be overridden from the environment. A failing run stops the
# script with its exit status and the tail of its output; each run's full output is in
# OUT/<comparison>/<run>/console.log.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
QUICK="${QUICK:-0}"
q() { if [ "$QUICK" = 1 ]; then echo "$2"; else echo "$1"; fi; }  # q FULL QUICK

OUT="${OUT:-$REPO/logs/reproduce-$(date +%Y%m%d-%H%M%S)$(q "" -quick)}"
RESULTS_DIR="${RESULTS_DIR:-$(q "$REPO/docs/results" "$OUT/results")}"  # compact records
PAGE="${PAGE:-$(q "$REPO/docs/RESULTS.md" "$OUT/RESULTS.md")}"        # regenerated page
ONLY="${ONLY:-grid,ablations,window,tablev,clocks,buffer,inject}"
BACKEND_="${REPRO_BACKEND:-gloo}"
RANKS_="${REPRO_RANKS:-2}"                 # virtual-clock runs: their devices in this many
                                           # ranks (--devices-per-rank: the same results as
                                           # one rank per device, far less start-up and
                                           # collective overhead); 0: one rank per device
MODEL_="${MODEL:-smallcnn-bn}"             # batch norm, as the paper's ResNet152 and VGG19-bn:
                                           # without it, global batches of 4k-16k samples at
                                           # lr 0.1 collapse (ablations)
INJ_MODELS="${INJ_MODELS:-smallcnn-bn,smallcnn}"  # inject: with batch norm (non-IID skew
                                                 # hurts) and without (it does not)
DATASET_="${DATASET:-fashion-mnist}"
LR_="${LR:-0.1}"                           # base lr for a global batch of 64 x devices
EVAL_SAMPLES_="${EVAL_SAMPLES:-1000}"
COMM_PAPER="${COMM_MODEL:-paper-ethernet}"

# grid: the paper's Fig. 6 / Table VI
GRID_WORLD="${GRID_WORLD:-$(q 16 4)}"
GRID_RATES="${GRID_RATES:-$(q S1,S2,S10,S20 S10,S2)}"
GRID_SEEDS_RESNET="${GRID_SEEDS_RESNET:-$(q 0,1,2 0)}"
GRID_SEEDS_VGG="${GRID_SEEDS_VGG:-$(q 0,1 0)}"
GRID_DDP_STEPS="${GRID_DDP_STEPS:-$(q 120 6)}"   # the budget: this many predicted ddp steps
GRID_MAX_STEPS="${GRID_MAX_STEPS:-$(q 300 20)}"  # and at most this many steps of any run
GRID_EVALS="${GRID_EVALS:-$(q 60 3)}"            # evaluations over the budget
GRID_BMIN="${GRID_BMIN:-8}"
GRID_BMAX="${GRID_BMAX:-1024}"
GRID_CR="${GRID_CR:-0.1}"
GRID_DELTA="${GRID_DELTA:-0.3}"
# ablations (ResNet152 timing)
ABL_RATES="${ABL_RATES:-$GRID_RATES}"
ABL_SEED="${ABL_SEED:-0}"
ABL_CELL="${ABL_CELL:-S10}"              # the lr-cap and model ablations: one rate set
ABL_NOBN_MODEL="${ABL_NOBN_MODEL:-smallcnn}"
# window: cheap compute, b_max 64, where a full buffer waits out the window
WIN_WORLD="${WIN_WORLD:-$(q 4 2)}"
WIN_RATES="${WIN_RATES:-S2}"
WIN_SEEDS="${WIN_SEEDS:-$(q 0,1 0)}"
WIN_STREAM_S="${WIN_STREAM_S:-$(q 150 6)}"
WIN_COMPUTE="${WIN_COMPUTE:-linear:0.05,0.002}"
# tablev: adaptive Top-k over delta x CR, over Kafka
TV_WORLD="${TV_WORLD:-$(q 8 2)}"
TV_RATES="${TV_RATES:-S10}"
TV_SEED="${TV_SEED:-0}"
TV_STREAM_S="${TV_STREAM_S:-$(q 300 12)}"
TV_DELTAS="${TV_DELTAS:-$(q 0.1,0.2,0.3,0.4 0.3)}"
TV_RATIOS="${TV_RATIOS:-$(q 0.1,0.01 0.1)}"
# clocks: wall clock over Kafka against its virtual replay
CLK_WORLD="${CLK_WORLD:-4}"
CLK_RATES="${CLK_RATES:-16,24,32,48}"
CLK_STREAM_S="${CLK_STREAM_S:-$(q 90 8)}"
CLK_DELAY_S="${CLK_DELAY_S:-15}"        # the stream starts this long after launch (ranks up)
# buffer policies on fast streams
BUF_WORLD="${BUF_WORLD:-$(q 8 2)}"
BUF_RATES="${BUF_RATES:-S2}"
BUF_SEEDS="${BUF_SEEDS:-$(q 0,1 0)}"
BUF_STREAM_S="${BUF_STREAM_S:-$(q 300 30)}"
BUF_CAPACITY="${BUF_CAPACITY:-10000000}"  # unbounded: persistence's backlog is what is measured
# injection on one-label devices
INJ_WORLD="${INJ_WORLD:-$(q 10 3)}"
INJ_RATE="${INJ_RATE:-64}"
INJ_SHARE="${INJ_SHARE:-0.25}"           # alpha = beta
INJ_BUDGET="${INJ_BUDGET:-$(q 60000 2500)}"  # samples trained per run (local + injected)
INJ_LR="${INJ_LR:-0.05}"
INJ_SEEDS="${INJ_SEEDS:-$(q 0,1 0)}"

say() { printf '%s\n' "reproduce: $*"; }
die() { printf '%s\n' "reproduce: $*" >&2; exit 1; }
[ -x "$PYTHON" ] || die "no Python at $PYTHON: run 'make venv' first (or set PYTHON)"
wanted() { [[ ",$ONLY," == *",$1,"* ]]; }
list() { tr ',' ' ' <<< "$1"; }
count() { list "$1" | wc -w; }
py() { PYTHONPATH="$REPO" "$PYTHON" "$@"; }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
START_S=$SECONDS
RUN_INDEX=0
declare -A DIRS LABELS   # comparison -> space-separated run dirs / comma-separated labels

# Number of runs (for "[k/N]"), from the same settings as below.
count_runs() {
  local n=0
  wanted grid && n=$((n + 4 * $(count "$GRID_RATES") * ($(count "$GRID_SEEDS_RESNET") \
                                                        + $(count "$GRID_SEEDS_VGG"))))
  wanted ablations && n=$((n + 2 * $(count "$ABL_RATES") + 4))
  wanted window && n=$((n + 3 * $(count "$WIN_SEEDS")))
  wanted tablev && n=$((n + 1 + $(count "$TV_DELTAS") * $(count "$TV_RATIOS")))
  wanted clocks && n=$((n + 2))
  wanted buffer && n=$((n + 2 * $(count "$BUF_SEEDS")))
  wanted inject && n=$((n + 3 * $(count "$INJ_MODELS") * $(count "$INJ_SEEDS")))
  echo "$n"
}
RUN_TOTAL="$(count_runs)"

# Show the lines of a run's output that say how far it is; keep all of it in console.log.
progress_filter() {  # progress_filter TAG LOGFILE
  local tag="$1" log="$2" line
  while IFS= read -r line; do
    printf '%s\n' "$line" >> "$log"
    case "$line" in
      step*|"eval step"*|*error*|*Error*|*failed*|"launch: done"*)
        printf '  [%s] %s\n' "$tag" "$line" ;;
    esac
  done
}

# One training run through common.sh / scadles.launch, then its compact record.
#   run_one COMPARISON LABEL DIRNAME param=value... [-- extra launcher flags]
# LABEL names the run and its record (RESULTS_DIR/COMPARISON/LABEL.json; a -seedN suffix
# groups seeds); DIRNAME is its log folder under OUT/COMPARISON.
run_one() {
  local comparison="$1" label="$2" dirname="$3"
  shift 3
  local log_dir="$OUT/$comparison/$dirname"
  RUN_INDEX=$((RUN_INDEX + 1))
  local tag="$RUN_INDEX/$RUN_TOTAL $label"
  if [ -e "$log_dir" ]; then
    die "$log_dir exists already: give a fresh OUT (runs are never overwritten)"
  fi
  mkdir -p "$log_dir"
  say "[$tag] $comparison: $dirname (elapsed $(( SECONDS - START_S )) s)"
  local started=$SECONDS status
  set +e
  (
    set -e
    # Every launcher parameter is set here, so nothing leaks in from the environment
    # except EXTRA_ARGS (added to every run) and ERROR_FEEDBACK.
    mode=scadles backend="$BACKEND_" model="$MODEL_" dataset="$DATASET_" partition=iid
    world_size=2 devices_per_rank=1 seed=0 rates=S10 source=inprocess lr="$LR_" clock=virtual
    compute_model=paper-resnet152 comm_model="$COMM_PAPER" policy=persistence
    compression=none alpha=0 beta=0 eval_samples="$EVAL_SAMPLES_" checkpoint_every=0
    max_steps=0 rate_schedule=constant arrivals=even momentum=0.9 weight_decay=1e-4
    min_train_bsz=8 max_train_bsz=64 train_bsz=64 window_s=1.0 buffer_capacity=10000
    warmup_epochs=0.1 max_lr=0.1 step_when_full=0 stream_delay_s=0
    global_bsz= duration_s= max_stream_s= eval_steps=0 eval_every_s=0 milestones= gamma=0.1
    topic_prefix= data_dir="${DATA_DIR:-}" image_size= compression_ratio=0.01
    delta_threshold=0.3 adaptive_signal=paper ewma_alpha=0.1 gradnorm_threshold=
    gradnorm_interval= inject_from=devices pool_topic=
    local -a extra=()
    while [ $# -gt 0 ]; do
      if [ "$1" = -- ]; then shift; extra=("$@"); break; fi
      printf -v "${1%%=*}" '%s' "${1#*=}"
      shift
    done
    log_dir="$log_dir"
    # world_size=N below means N devices: on the virtual clock, RANKS_ ranks simulate them.
    if [ "$clock" = virtual ] && [ "$RANKS_" -gt 0 ] && [ "$world_size" -gt "$RANKS_" ] \
        && [ $(( world_size % RANKS_ )) -eq 0 ]; then
      devices_per_rank=$(( world_size / RANKS_ ))
      world_size="$RANKS_"
    fi
    # common.sh must not refill the parameters left empty on purpose from the environment.
    unset RATES RATES_SCHEDULE DURATION_S MAX_STREAM_S GLOBAL_BSZ MILESTONES TOPIC_PREFIX \
          IMAGE_SIZE GRADNORM_THRESHOLD GRADNORM_INTERVAL POOL_TOPIC LOG_DIR STEP_WHEN_FULL \
          STREAM_DELAY_S
    # shellcheck source=common.sh
    source "$REPO/execution_scripts/common.sh"
    run_scadles "${extra[@]}"
  ) 2>&1 | progress_filter "$tag" "$log_dir/console.log"
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    printf '%s\n' "reproduce: run '$label' ($comparison) FAILED with exit status $status" \
                  "reproduce: its last lines ($log_dir/console.log):" >&2
    tail -n 25 "$log_dir/console.log" | sed 's/^/  | /' >&2
    exit "$status"
  fi
  say "[$tag] done in $(( SECONDS - started )) s: $(py -c "
import json, sys
s = json.load(open(sys.argv[1] + '/run.json'))['summary']
print(f\"{s['steps']} steps, {s['stream_s']:.0f} s of stream, {s['samples']} samples, \"
      f\"final top-1 {s['final_top1']:.2f}%, best {s['best_top1']:.2f}%\")" "$log_dir")"
  printf '%s %s\n' "$label" "$log_dir" >> "$OUT/$comparison/runs.txt"
  store_record "$comparison" "$label" "$log_dir"
}

store_record() {  # store_record COMPARISON LABEL LOG_DIR
  py -m scadles.results store "$3" "$RESULTS_DIR/$1/$2.json" > /dev/null \
    || die "storing the record of $3 failed (see above)"
  DIRS[$1]+="$3 "
  LABELS[$1]+="${LABELS[$1]:+,}$2"
}

# The stream-time budget of a grid cell and seed, and its evaluation interval:
# GRID_DDP_STEPS steps of ddp's predicted pace on the seed's drawn rates.
grid_budget() {  # grid_budget RATES SEED TIMING -> "STREAM_S EVAL_EVERY_S"
  py -c "
import sys
from scadles.predict import predict
from streamsim.schedule import parse_rates
rates, world, seed, timing, steps, evals, comm = sys.argv[1:]
p = predict(parse_rates(rates, int(world), int(seed)), compute_model='paper-' + timing,
            comm_model=comm)
budget = int(steps) * p.ddp.step_s
print(f'{budget:.1f} {budget / int(evals):.3f}')" \
    "$1" "$GRID_WORLD" "$2" "$3" "$GRID_DDP_STEPS" "$GRID_EVALS" "$COMM_PAPER"
}

# -- grid: Fig. 6 and Table VI ---------------------------------------------------------------
run_grid() {
  local timing seeds rates seed budget every common
  for timing in resnet152 vgg19; do
    seeds="$GRID_SEEDS_RESNET"; [ "$timing" = vgg19 ] && seeds="$GRID_SEEDS_VGG"
    for rates in $(list "$GRID_RATES"); do
      for seed in $(list "$seeds"); do
        read -r budget every <<< "$(grid_budget "$rates" "$seed" "$timing")"
        common=(world_size="$GRID_WORLD" rates="$rates" seed="$seed"
                compute_model="paper-$timing" max_stream_s="$budget" eval_every_s="$every"
                max_steps="$GRID_MAX_STEPS" min_train_bsz="$GRID_BMIN" max_train_bsz="$GRID_BMAX")
        run_one grid "$timing-$rates-ddp-seed$seed" \
          "${MODEL_}_ddp_${rates}_w${GRID_WORLD}_bsz64_$timing-seed$seed" "${common[@]}" mode=ddp
        run_one grid "$timing-$rates-fig6-seed$seed" \
          "${MODEL_}_scadles_${rates}_w${GRID_WORLD}_persistence_bmax${GRID_BMAX}_$timing-seed$seed" \
          "${common[@]}"
        run_one grid "$timing-$rates-full-seed$seed" \
          "${MODEL_}_scadles_${rates}_w${GRID_WORLD}_truncation_adaptive${GRID_CR}-${GRID_DELTA}_$timing-seed$seed" \
          "${common[@]}" policy=truncation compression=adaptive \
          compression_ratio="$GRID_CR" delta_threshold="$GRID_DELTA"
        run_one grid "$timing-$rates-bounded-seed$seed" \
          "${MODEL_}_scadles_${rates}_w${GRID_WORLD}_persistence_bmax64_whenfull_$timing-seed$seed" \
          "${common[@]}" max_train_bsz=64 step_when_full=1
      done
    done
  done
}

# -- ablations: ddp batch 16, ScaDLES b_min 1 -------------------------------------------------
run_ablations() {
  local rates budget every common
  for rates in $(list "$ABL_RATES"); do
    read -r budget every <<< "$(grid_budget "$rates" "$ABL_SEED" resnet152)"
    common=(world_size="$GRID_WORLD" rates="$rates" seed="$ABL_SEED"
            compute_model=paper-resnet152 max_stream_s="$budget" eval_every_s="$every"
            max_steps="$GRID_MAX_STEPS" max_train_bsz="$GRID_BMAX")
    run_one ablations "resnet152-$rates-ddp-bsz16-seed$ABL_SEED" \
      "${MODEL_}_ddp_${rates}_w${GRID_WORLD}_bsz16_resnet152-seed$ABL_SEED" "${common[@]}" \
      mode=ddp train_bsz=16
    run_one ablations "resnet152-$rates-fig6-bmin1-seed$ABL_SEED" \
      "${MODEL_}_scadles_${rates}_w${GRID_WORLD}_persistence_bmin1_resnet152-seed$ABL_SEED" \
      "${common[@]}" min_train_bsz=1
  done
  # The lr cap, and the model without batch norm (its own ddp baseline beside it).
  read -r budget every <<< "$(grid_budget "$ABL_CELL" "$ABL_SEED" resnet152)"
  common=(world_size="$GRID_WORLD" rates="$ABL_CELL" seed="$ABL_SEED"
          compute_model=paper-resnet152 max_stream_s="$budget" eval_every_s="$every"
          max_steps="$GRID_MAX_STEPS" max_train_bsz="$GRID_BMAX")
  run_one ablations "resnet152-$ABL_CELL-fig6-maxlr0.2-seed$ABL_SEED" \
    "${MODEL_}_scadles_${ABL_CELL}_w${GRID_WORLD}_persistence_maxlr0.2_resnet152-seed$ABL_SEED" \
    "${common[@]}" max_lr=0.2
  run_one ablations "resnet152-$ABL_CELL-ddp-nobn-seed$ABL_SEED" \
    "${ABL_NOBN_MODEL}_ddp_${ABL_CELL}_w${GRID_WORLD}_bsz64_resnet152-seed$ABL_SEED" \
    "${common[@]}" model="$ABL_NOBN_MODEL" mode=ddp
  run_one ablations "resnet152-$ABL_CELL-fig6-nobn-seed$ABL_SEED" \
    "${ABL_NOBN_MODEL}_scadles_${ABL_CELL}_w${GRID_WORLD}_persistence_resnet152-seed$ABL_SEED" \
    "${common[@]}" model="$ABL_NOBN_MODEL"
  run_one ablations "resnet152-$ABL_CELL-full-nobn-seed$ABL_SEED" \
    "${ABL_NOBN_MODEL}_scadles_${ABL_CELL}_w${GRID_WORLD}_truncation_adaptive${GRID_CR}-${GRID_DELTA}_resnet152-seed$ABL_SEED" \
    "${common[@]}" model="$ABL_NOBN_MODEL" policy=truncation compression=adaptive \
    compression_ratio="$GRID_CR" delta_threshold="$GRID_DELTA"
}

# -- window: cheap compute, where a full buffer waits out the window ----------------------------
run_window() {
  local seed common
  for seed in $(list "$WIN_SEEDS"); do
    common=(world_size="$WIN_WORLD" rates="$WIN_RATES" seed="$seed" compute_model="$WIN_COMPUTE"
            comm_model=auto max_stream_s="$WIN_STREAM_S" eval_every_s=5)
    run_one window "ddp-seed$seed" "${MODEL_}_ddp_${WIN_RATES}_w${WIN_WORLD}_cheap-seed$seed" \
      "${common[@]}" mode=ddp
    run_one window "scadles-seed$seed" \
      "${MODEL_}_scadles_${WIN_RATES}_w${WIN_WORLD}_bmax64_cheap-seed$seed" "${common[@]}"
    run_one window "scadles-step-when-full-seed$seed" \
      "${MODEL_}_scadles_${WIN_RATES}_w${WIN_WORLD}_bmax64_whenfull_cheap-seed$seed" \
      "${common[@]}" step_when_full=1
  done
}

# -- tablev: adaptive Top-k over delta x CR ----------------------------------------------------
run_tablev() {
  local ratio delta
  local -a common=(world_size="$TV_WORLD" rates="$TV_RATES" seed="$TV_SEED" source=kafka
                   policy=truncation max_train_bsz="$GRID_BMAX" max_stream_s="$TV_STREAM_S"
                   eval_every_s="$(( TV_STREAM_S / 10 > 1 ? TV_STREAM_S / 10 : 1 ))")
  run_one tablev none "${MODEL_}_scadles_${TV_RATES}_w${TV_WORLD}_truncation_none" "${common[@]}"
  for ratio in $(list "$TV_RATIOS"); do
    for delta in $(list "$TV_DELTAS"); do
      run_one tablev "adaptive-cr$ratio-delta$delta" \
        "${MODEL_}_scadles_${TV_RATES}_w${TV_WORLD}_truncation_adaptive$ratio-$delta" \
        "${common[@]}" compression=adaptive compression_ratio="$ratio" delta_threshold="$delta"
    done
  done
}

# -- clocks: a real-time run and its virtual replay ----------------------------------------------
run_clocks() {
  local -a common=(world_size="$CLK_WORLD" rates="$CLK_RATES" seed=0 source=kafka
                   max_stream_s="$CLK_STREAM_S" eval_every_s="$(( CLK_STREAM_S / 6 > 1 ? CLK_STREAM_S / 6 : 1 ))")
  run_one clocks wall "${MODEL_}_scadles_w${CLK_WORLD}_wallclock" "${common[@]}" clock=wall \
    compute_model=measured comm_model=auto stream_delay_s="$CLK_DELAY_S"
  # The replay charges what the wall-clock run measured: compute A + B x batch fitted to its
  # rows, and its mean exchange time.
  local fitted
  fitted="$(py - "$OUT/clocks/${MODEL_}_scadles_w${CLK_WORLD}_wallclock" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
rows = [json.loads(line) for f in sorted(Path(sys.argv[1]).glob("rank-*.jsonl"))
        for line in open(f) if '"kind": "train"' in line]
if not rows:
    sys.exit("the wall-clock run trained no step: nothing to fit (is CLK_DELAY_S long enough "
             "for the ranks to start?)")
b = np.array([r["local_bsz"] for r in rows], float)
t = np.array([r["compute_s"] for r in rows], float)
slope, intercept = np.polyfit(b, t, 1) if len(set(b)) > 1 else (0.0, float(t.mean()))
print(f"linear:{max(intercept, 0.0):.6f},{max(slope, 0.0):.8f} "
      f"fixed:{np.mean([r['sync_s'] for r in rows]):.6f}")
EOF
)" || die "fitting the wall-clock run's step time failed"
  run_one clocks virtual "${MODEL_}_scadles_w${CLK_WORLD}_virtual_replay" "${common[@]}" \
    clock=virtual compute_model="${fitted% *}" comm_model="${fitted#* }"
}

# -- buffer: persistence against truncation on fast streams ---------------------------------------
run_buffer() {
  local seed policy
  for seed in $(list "$BUF_SEEDS"); do
    for policy in persistence truncation; do
      run_one buffer "$policy-seed$seed" \
        "${MODEL_}_scadles_${BUF_RATES}_w${BUF_WORLD}_${policy}_bmax${GRID_BMAX}-seed$seed" \
        world_size="$BUF_WORLD" rates="$BUF_RATES" seed="$seed" policy="$policy" \
        max_train_bsz="$GRID_BMAX" buffer_capacity="$BUF_CAPACITY" \
        max_stream_s="$BUF_STREAM_S" eval_every_s="$(( BUF_STREAM_S / 10 > 1 ? BUF_STREAM_S / 10 : 1 ))"
    done
  done
}

# -- inject: non-IID devices, with and without injection --------------------------------------------
run_inject() {
  local seed share rates label name steps i model
  rates="$(for ((i = 0; i < INJ_WORLD; i++)); do printf '%s,' "$INJ_RATE"; done)"
  rates="${rates%,}"
  for seed in $(list "$INJ_SEEDS"); do
    for model in $(list "$INJ_MODELS"); do
    for share in iid 0 "$INJ_SHARE"; do
      # The same samples trained in every run: steps = budget / expected global batch
      # (local window plus, per chosen peer, beta of its window), as bench_injection.py.
      # iid: the same devices and budget on IID partitions, the reference non-IID is held to
      partition=noniid
      [ "$share" = iid ] && { partition=iid; share=0; }
      steps="$(py -c "
import sys
from scadles.inject import num_peers
share, world, rate, budget = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), \
    int(sys.argv[4])
g = world * (rate + num_peers(share, world) * share * rate)
print(max(1, round(budget / g)))" "$share" "$INJ_WORLD" "$INJ_RATE" "$INJ_BUDGET")"
      if [ "$partition" = iid ]; then label="$model-iid-seed$seed"; name="iid"
      elif [ "$share" = 0 ]; then label="$model-no-injection-seed$seed"; name="noinject"
      else label="$model-injection-a${share}-b${share}-seed$seed"; name="inject${share}-${share}"; fi
      run_one inject "$label" \
        "${model}_scadles_${partition}_w${INJ_WORLD}_rate${INJ_RATE}_${name}-seed$seed" \
        model="$model" world_size="$INJ_WORLD" partition="$partition" rates="$rates" \
        seed="$seed" source=kafka lr="$INJ_LR" min_train_bsz=1 \
        max_train_bsz="${INJ_RATE%.*}" compute_model=fixed:0.1 comm_model=fixed:0 \
        max_steps="$steps" eval_steps="$(( steps / 8 > 1 ? steps / 8 : 1 ))" \
        alpha="$share" beta="$share"
    done
    done
  done
}

# -- per-comparison reports (plots of the full logs) ----------------------------------------------
report() {  # report COMPARISON BASELINE
  local comparison="$1" baseline="$2"
  [ -n "${DIRS[$comparison]:-}" ] || return 0
  # shellcheck disable=SC2086
  py -m scadles.report ${DIRS[$comparison]} --out "$OUT/report/$comparison" \
    --labels "${LABELS[$comparison]}" ${baseline:+--baseline "$baseline"} > /dev/null \
    || die "the report of $comparison failed (see above)"
}

# REPORT_ONLY=1: the runs listed in OUT/<comparison>/runs.txt, stored and reported again.
load_runs() {
  local comparison label dir
  RUN_TOTAL=0
  for comparison in grid ablations window tablev clocks buffer inject; do
    [ -f "$OUT/$comparison/runs.txt" ] || continue
    rm -rf "${RESULTS_DIR:?}/$comparison"
    while read -r label dir; do
      store_record "$comparison" "$label" "$dir"
      RUN_TOTAL=$((RUN_TOTAL + 1))
    done < "$OUT/$comparison/runs.txt"
  done
}

if [ "${REPORT_ONLY:-0}" = 1 ]; then
  say "REPORT_ONLY=1: storing and reporting the runs listed in $OUT/*/runs.txt again"
  load_runs
  rm -rf "$OUT/report"
else
  say "writing to $OUT, records to $RESULTS_DIR ($RUN_TOTAL runs$( [ "$QUICK" = 1 ] && echo ', QUICK smoke settings'))"
  # The commit the runs come from, checked before this script touches its own outputs
  # (the records, the page and its figures, which it rewrites).
  commit="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  dirty=false
  [ -z "$(git -C "$REPO" status --porcelain --untracked-files=no -- . ':!docs/results' \
          ':!docs/RESULTS.md' ':!docs/figures' 2>/dev/null)" ] || dirty=true
  for comparison in $(list "$ONLY"); do rm -rf "${RESULTS_DIR:?}/$comparison"; done
  started="$(date -u '+%Y-%m-%d %H:%M UTC')"
  wanted grid && run_grid
  wanted ablations && run_ablations
  wanted window && run_window
  wanted tablev && run_tablev
  wanted clocks && run_clocks
  wanted buffer && run_buffer
  wanted inject && run_inject
  mkdir -p "$RESULTS_DIR"
  # provenance.json: per comparison, which invocation made its records (a later ONLY=...
  # run replaces only its own comparisons' entries).
  py - "$RESULTS_DIR/provenance.json" "$ONLY" <<EOF
import json, sys
from pathlib import Path
path, only = Path(sys.argv[1]), sys.argv[2].split(",")
doc = json.loads(path.read_text()) if path.is_file() else {}
if not isinstance(doc.get("comparisons"), dict):
    doc = {"comparisons": {}}
run = {"command": "bash execution_scripts/reproduce_cpu.sh", "commit": "$commit",
       "dirty": $( [ "$dirty" = true ] && echo True || echo False), "started": "$started",
       "wall_s": $(( SECONDS - START_S )), "cpus": $(nproc), "only": only,
       "quick": $( [ "$QUICK" = 1 ] && echo True || echo False)}
for comparison in only:
    doc["comparisons"][comparison] = run
path.write_text(json.dumps(doc, indent=1) + "\n")
EOF
  say "all $RUN_TOTAL runs done in $(( SECONDS - START_S )) s"
fi

mkdir -p "$OUT/report"
report window ddp
report tablev none
report clocks wall
report buffer persistence
report inject smallcnn-bn-no-injection
# The results page: the repository's (its template when QUICK=1), regenerated from the records.
[ -f "$PAGE" ] || cp "$REPO/docs/RESULTS.md" "$PAGE"
[ -f "$RESULTS_DIR/compute_fit.json" ] || cp "$REPO/docs/results/compute_fit.json" "$RESULTS_DIR/" 2>/dev/null || true
py -m scadles.report --write-results "$PAGE" || die "regenerating $PAGE failed (see above)"
py -m scadles.report --verify-results "$PAGE" > /dev/null || die "$PAGE does not match its records"
say "results page: $PAGE (figures in $(dirname "$PAGE")/figures); per-comparison reports in $OUT/report/"
