#!/usr/bin/env bash
# Reproduce the paper's four claims at CPU scale: Fashion-MNIST, a small CNN, a virtual clock
# with a modelled compute time (deterministic, independent of how loaded this machine is),
# then one report per comparison and an index of all of them.
#
#   bash execution_scripts/reproduce_cpu.sh            # full: ~25-35 min on 2 CPU cores
#   QUICK=1 bash execution_scripts/reproduce_cpu.sh    # smoke run: a few minutes
#   OUT=/tmp/r ONLY=tta-S10,inject bash execution_scripts/reproduce_cpu.sh
#   OUT=/tmp/r REPORT_ONLY=1 bash execution_scripts/reproduce_cpu.sh   # redo the reports only
#
# The comparisons (each a folder under OUT, each with its report under OUT/report/):
#   tta-S10, tta-S1  ScaDLES against the ddp baseline (fixed batch 64 per device, persistence,
#                    waits for the slowest stream), 16 IID devices, rates drawn from the paper's
#                    S10 / S1 distributions (a new draw per seed). Claim: up to 3.29x faster
#                    convergence (time to a target accuracy, in stream seconds).
#   buffer           persistence against truncation on fast streams (S2, ~300 samples/s per
#                    device) that a device cannot train at line rate (at most 64 samples per
#                    1-s window): persistence's backlog grows, truncation keeps one window.
#                    Claim: buffers 848x-9,429x smaller at little accuracy cost.
#   inject           10 devices with one label each (noniid), without and with randomized data
#                    injection (alpha = beta = 0.25), the same number of samples trained. Uses
#                    the batch-norm variant of the small CNN: without batch norm, weighted
#                    aggregation over all devices already gives the balanced gradient and
#                    non-IID streams cost nothing (see docs/RESULTS.md).
#   compression      no compression / static Top-k / adaptive compression, with an edge link
#                    model (--comm-model link:MBIT/S,LATENCY) so the bytes a step sends cost
#                    stream time.
# Streams: the long or fast comparisons (tta-*, buffer) use in-process streams (the same
# records the Kafka producer would send, generated in each rank; millions of records would
# not fit the embedded broker's memory), inject and compression go through the real embedded
# Kafka broker. SOURCE=kafka|inprocess forces one source for all.
#
# Every parameter below can be overridden from the environment. Runs go through common.sh
# and `python -m scadles.launch`, like the other execution scripts. A failing run stops the
# script with its exit status and the tail of its output; the full output of each run is in
# OUT/<comparison>/<run>/console.log.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
QUICK="${QUICK:-0}"
q() { if [ "$QUICK" = 1 ]; then echo "$2"; else echo "$1"; fi; }  # q FULL QUICK

OUT="${OUT:-$REPO/logs/reproduce-$(date +%Y%m%d-%H%M%S)$(q "" -quick)}"
ONLY="${ONLY:-tta-S10,tta-S1,buffer,inject,compression}"   # comparisons to run
BACKEND_="${REPRO_BACKEND:-gloo}"
MODEL_="${MODEL:-smallcnn}"                 # comparisons tta, buffer, compression
BN_MODEL="${BN_MODEL:-smallcnn-bn}"         # the injection comparison (batch norm)
DATASET_="${DATASET:-fashion-mnist}"
LR_="${LR:-0.1}"                            # base lr for a global batch of 64 x devices
COMPUTE="${COMPUTE_MODEL:-linear:0.05,0.002}"  # modelled step: 50 ms + 2 ms per sample
EVAL_SAMPLES_="${EVAL_SAMPLES:-2000}"
SOURCE_FAST="${SOURCE:-inprocess}"          # tta-*, buffer
SOURCE_KAFKA="${SOURCE:-kafka}"             # inject, compression

# (1) time to accuracy: both modes for a number of steps. A scadles step lasts one 1-s window
# unless its slowest stream needs longer to deliver b_min = 8 samples; a ddp step lasts as long
# as the slowest stream needs to deliver 64 samples (up to a minute with S1 rates).
TTA_WORLD="${TTA_WORLD:-$(q 16 2)}"
TTA_SEEDS="${TTA_SEEDS:-$(q 0,1 0)}"
TTA_SCADLES_STEPS="${TTA_SCADLES_STEPS:-$(q 250 12)}"
TTA_DDP_STEPS="${TTA_DDP_STEPS:-$(q 120 6)}"
TTA_SCADLES_EVAL="${TTA_SCADLES_EVAL:-$(q 5 4)}"   # evaluate every N steps
TTA_DDP_EVAL="${TTA_DDP_EVAL:-$(q 2 2)}"
TTA_TARGET="${TTA_TARGET:-$(q 75 '')}"           # top-1 % for time to target ('' = report's)
# (2) buffer policies on fast streams
BUF_WORLD="${BUF_WORLD:-$(q 8 2)}"
BUF_RATES="${BUF_RATES:-S2}"
BUF_SEEDS="${BUF_SEEDS:-$(q 0,1 0)}"
BUF_STREAM_S="${BUF_STREAM_S:-$(q 200 10)}"
BUF_TARGET="${BUF_TARGET:-$(q 80 '')}"
BUF_CAPACITY="${BUF_CAPACITY:-1000000}"  # large: persistence's backlog is what is measured
# (3) injection on one-label devices
INJ_WORLD="${INJ_WORLD:-$(q 10 3)}"
INJ_RATE="${INJ_RATE:-64}"
INJ_SHARE="${INJ_SHARE:-0.25}"           # alpha = beta
INJ_BUDGET="${INJ_BUDGET:-$(q 60000 2500)}"  # samples trained per run (local + injected)
INJ_LR="${INJ_LR:-0.05}"
INJ_SEEDS="${INJ_SEEDS:-$(q 0,1 0)}"
INJ_TARGET="${INJ_TARGET:-$(q 70 '')}"
# (4) compression with a modelled edge link
COMP_WORLD="${COMP_WORLD:-$(q 8 2)}"
COMP_RATES="${COMP_RATES:-S10}"
COMP_SEEDS="${COMP_SEEDS:-$(q 0,1,2 0)}"
COMP_STREAM_S="${COMP_STREAM_S:-$(q 300 12)}"
COMP_LINK="${COMP_LINK:-link:2,0.01}"    # 2 Mbit/s uplink, 10 ms latency
COMP_RATIO="${COMP_RATIO:-0.01}"         # Top-k (static, adaptive): fraction of elements sent
COMP_MILD_RATIO="${COMP_MILD_RATIO-$(q 0.1 "")}"  # a milder static Top-k beside it ("" = none)
COMP_DELTA="${COMP_DELTA:-0.55}"         # adaptive: compress when the signal is <= this
COMP_TARGET="${COMP_TARGET:-$(q 75 '')}"

say() { printf '%s\n' "reproduce: $*"; }
die() { printf '%s\n' "reproduce: $*" >&2; exit 1; }
[ -x "$PYTHON" ] || die "no Python at $PYTHON: run 'make venv' first (or set PYTHON)"
wanted() { [[ ",$ONLY," == *",$1,"* ]]; }
seeds() { tr ',' ' ' <<< "$1"; }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
START_S=$SECONDS
RUN_INDEX=0
declare -A DIRS LABELS   # comparison -> space-separated run dirs / comma-separated labels

# Number of runs (for "[k/N]"), from the same settings as below.
count_runs() {
  local n=0 s
  wanted tta-S10 && n=$((n + 2 * $(seeds "$TTA_SEEDS" | wc -w)))
  wanted tta-S1 && n=$((n + 2 * $(seeds "$TTA_SEEDS" | wc -w)))
  wanted buffer && n=$((n + 2 * $(seeds "$BUF_SEEDS" | wc -w)))
  wanted inject && n=$((n + 2 * $(seeds "$INJ_SEEDS" | wc -w)))
  wanted compression && n=$((n + ($([ -n "$COMP_MILD_RATIO" ] && echo 4 || echo 3)) \
                                   * $(seeds "$COMP_SEEDS" | wc -w)))
  echo "$n"
}
RUN_TOTAL="$(count_runs)"

# The stream length a scadles run of STEPS steps needs: its steps last at least one window,
# and as long as the slowest stream needs to deliver b_min samples (the launcher's default
# length assumes one window per step, which cuts very slow streams short).
scadles_duration() {  # scadles_duration RATES WORLD SEED STEPS -> seconds
  PYTHONPATH="$REPO" "$PYTHON" -c "
import math, sys
from streamsim.schedule import parse_rates
slowest = min(parse_rates(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
print(math.ceil(1.5 * int(sys.argv[4]) * max(1.0, 8 / slowest) + 10))" "$@"
}

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

# One training run through common.sh / scadles.launch.
#   run_one COMPARISON LABEL DIRNAME param=value... [-- extra launcher flags]
# LABEL names the run in the report (a -seedN suffix groups seeds); DIRNAME is its log folder
# under OUT/COMPARISON, named after model, method and key settings.
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
    world_size=2 seed=0 rates=S10 source="$SOURCE_FAST" lr="$LR_" clock=virtual
    compute_model="$COMPUTE" comm_model=auto policy=persistence compression=none
    alpha=0 beta=0 eval_samples="$EVAL_SAMPLES_" checkpoint_every=0 max_steps=0
    rate_schedule=constant arrivals=even momentum=0.9 weight_decay=1e-4
    min_train_bsz=8 max_train_bsz=64 train_bsz=64 window_s=1.0 buffer_capacity=10000
    global_bsz= duration_s= max_stream_s= eval_steps=50 milestones= gamma=0.1
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
    # common.sh must not refill the parameters left empty on purpose from the environment.
    unset RATES RATES_SCHEDULE DURATION_S MAX_STREAM_S GLOBAL_BSZ MILESTONES TOPIC_PREFIX \
          IMAGE_SIZE GRADNORM_THRESHOLD GRADNORM_INTERVAL POOL_TOPIC LOG_DIR
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
  say "[$tag] done in $(( SECONDS - started )) s: $(PYTHONPATH="$REPO" "$PYTHON" -c "
import json, sys
s = json.load(open(sys.argv[1] + '/run.json'))['summary']
print(f\"{s['steps']} steps, {s['stream_s']:.0f} s of stream, {s['samples']} samples, \"
      f\"final top-1 {s['final_top1']:.2f}%, best {s['best_top1']:.2f}%\")" "$log_dir")"
  printf '%s %s\n' "$label" "$log_dir" >> "$OUT/$comparison/runs.txt"
  DIRS[$comparison]+="$log_dir "
  LABELS[$comparison]+="${LABELS[$comparison]:+,}$label"
}

# REPORT_ONLY=1: the runs listed in OUT/<comparison>/runs.txt, reported again.
load_runs() {
  local comparison label dir
  RUN_TOTAL=0
  for comparison in tta-S10 tta-S1 buffer inject compression; do
    [ -f "$OUT/$comparison/runs.txt" ] || continue
    while read -r label dir; do
      DIRS[$comparison]+="$dir "
      LABELS[$comparison]+="${LABELS[$comparison]:+,}$label"
      RUN_TOTAL=$((RUN_TOTAL + 1))
    done < "$OUT/$comparison/runs.txt"
  done
}

# -- (1) ScaDLES vs ddp: time to accuracy -------------------------------------------------------
run_tta() {  # run_tta RATES
  local rates="$1" seed
  for seed in $(seeds "$TTA_SEEDS"); do
    local common=(world_size="$TTA_WORLD" rates="$rates" seed="$seed" source="$SOURCE_FAST")
    run_one "tta-$rates" "scadles-$rates-seed$seed" \
      "${MODEL_}_scadles_${rates}_w${TTA_WORLD}_persistence-seed$seed" "${common[@]}" \
      mode=scadles max_steps="$TTA_SCADLES_STEPS" eval_steps="$TTA_SCADLES_EVAL" \
      duration_s="$(scadles_duration "$rates" "$TTA_WORLD" "$seed" "$TTA_SCADLES_STEPS")"
    run_one "tta-$rates" "ddp-$rates-seed$seed" \
      "${MODEL_}_ddp_${rates}_w${TTA_WORLD}_bsz64_persistence-seed$seed" "${common[@]}" \
      mode=ddp max_steps="$TTA_DDP_STEPS" eval_steps="$TTA_DDP_EVAL"
  done
}

# -- (2) persistence vs truncation ------------------------------------------------------------
run_buffer() {
  local seed
  for seed in $(seeds "$BUF_SEEDS"); do
    for policy in persistence truncation; do
      run_one buffer "$policy-seed$seed" \
        "${MODEL_}_scadles_${BUF_RATES}_w${BUF_WORLD}_${policy}_cap${BUF_CAPACITY}-seed$seed" \
        world_size="$BUF_WORLD" rates="$BUF_RATES" seed="$seed" policy="$policy" \
        buffer_capacity="$BUF_CAPACITY" max_stream_s="$BUF_STREAM_S" \
        eval_steps="$(( BUF_STREAM_S / 10 > 1 ? BUF_STREAM_S / 10 : 1 ))"
    done
  done
}

# -- (3) non-IID devices, with and without injection ----------------------------------------------
run_inject() {
  local seed share rates label name global steps i
  rates="$(for ((i = 0; i < INJ_WORLD; i++)); do printf '%s,' "$INJ_RATE"; done)"
  rates="${rates%,}"
  for seed in $(seeds "$INJ_SEEDS"); do
    for share in 0 "$INJ_SHARE"; do
      # The same samples trained in every run: steps = budget / expected global batch
      # (local window plus, per chosen peer, beta of its window), as bench_injection.py.
      read -r global steps <<< "$(PYTHONPATH="$REPO" "$PYTHON" -c "
import sys
from scadles.inject import num_peers
share, world, rate, budget = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), \
    int(sys.argv[4])
g = world * (rate + num_peers(share, world) * share * rate)
print(round(g), max(1, round(budget / g)))" "$share" "$INJ_WORLD" "$INJ_RATE" "$INJ_BUDGET")"
      if [ "$share" = 0 ]; then label="no-injection-seed$seed"; name="noinject"
      else label="injection-a${share}-b${share}-seed$seed"; name="inject${share}-${share}"; fi
      run_one inject "$label" \
        "${BN_MODEL}_scadles_noniid_w${INJ_WORLD}_rate${INJ_RATE}_${name}-seed$seed" \
        model="$BN_MODEL" world_size="$INJ_WORLD" partition=noniid rates="$rates" \
        seed="$seed" source="$SOURCE_KAFKA" lr="$INJ_LR" min_train_bsz=1 \
        max_train_bsz="${INJ_RATE%.*}" compute_model=fixed:0.1 comm_model=fixed:0 \
        max_steps="$steps" eval_steps="$(( steps / 8 > 1 ? steps / 8 : 1 ))" \
        alpha="$share" beta="$share"
    done
  done
}

# -- (4) compression -------------------------------------------------------------------------
run_compression() {
  local seed method ratio label settings
  local -a methods=(none:1 static:"$COMP_RATIO" adaptive:"$COMP_RATIO")
  [ -n "$COMP_MILD_RATIO" ] && methods=(none:1 static:"$COMP_MILD_RATIO" "${methods[@]:1}")
  for seed in $(seeds "$COMP_SEEDS"); do
    for method in "${methods[@]}"; do
      ratio="${method#*:}"
      method="${method%%:*}"
      label="$method" settings=""
      if [ "$method" != none ]; then label+="-$ratio"; settings="_topk$ratio"; fi
      [ "$method" = adaptive ] && settings+="_delta${COMP_DELTA}"
      run_one compression "$label-seed$seed" \
        "${MODEL_}_scadles_${COMP_RATES}_w${COMP_WORLD}_${method}${settings}_${COMP_LINK//[:,]/-}-seed$seed" \
        world_size="$COMP_WORLD" rates="$COMP_RATES" seed="$seed" source="$SOURCE_KAFKA" \
        compression="$method" compression_ratio="$ratio" delta_threshold="$COMP_DELTA" \
        comm_model="$COMP_LINK" max_stream_s="$COMP_STREAM_S" \
        eval_steps="$(( COMP_STREAM_S / 30 > 1 ? COMP_STREAM_S / 30 : 1 ))"
    done
  done
}

# -- reports ---------------------------------------------------------------------------------
report() {  # report COMPARISON BASELINE TARGET DESCRIPTION
  local comparison="$1" baseline="$2" target="$3" description="$4"
  [ -n "${DIRS[$comparison]:-}" ] || return 0
  local -a args=(--out "$OUT/report/$comparison" --labels "${LABELS[$comparison]}"
                 --baseline "$baseline")
  [ -n "$target" ] && args+=(--target "$target")
  # shellcheck disable=SC2086
  PYTHONPATH="$REPO" "$PYTHON" -m scadles.report ${DIRS[$comparison]} "${args[@]}" \
    || die "the report of $comparison failed (see above)"
  local extra=""
  case "$comparison" in  # a table of its own for the claims the report's table misses
    # shellcheck disable=SC2086
    buffer) extra="$(buffer_peaks "$OUT/report/buffer/peak_buffers.md" ${DIRS[buffer]})" \
              || die "the peak buffer table failed (see above)" ;;
    # shellcheck disable=SC2086
    inject) extra="$(inject_top5 "$OUT/report/inject/top5.md" ${DIRS[inject]})" \
              || die "the top-5 table failed (see above)" ;;
    # shellcheck disable=SC2086
    tta-*) extra="$(tta_paired "$OUT/report/$comparison" "$target" ${DIRS[$comparison]})" \
             || die "the paired speedup table of $comparison failed (see above)" ;;
  esac
  [ -z "$extra" ] || printf '%s\n' "$extra"
  {
    printf '\n## %s\n\n%s\n\n' "$comparison" "$description"
    [ -z "$extra" ] || printf '%s\n\n' "$extra"
    # The comparison's page, its headings one level down and its plots in its folder.
    sed -e 's/^#/##/' -e "s#](\([A-Za-z_]*\.png\))#]($comparison/\1)#g" \
      "$OUT/report/$comparison/report.md"
  } >> "$OUT/report/index.md"
}

# The buffer comparison's peak buffers, per run and as persistence / truncation per seed: the
# most samples any device's buffer held (the run summary's per-device peak, counted as samples
# are admitted). The report's "Peak buffer" column is read from the step rows, which log the
# buffer after the batch was taken (truncation then logs 0).
buffer_peaks() {  # buffer_peaks OUTFILE RUN_DIR...
  PYTHONPATH="$REPO" "$PYTHON" - "$@" <<'EOF'
import sys
from pathlib import Path
from scadles.report import load_run

out, dirs = Path(sys.argv[1]), sys.argv[2:]
rows = {}
for d in dirs:
    run = load_run(d)
    devices = run.summary.get("devices") or []
    if devices:
        peak = max(int(dev["peak_buffer"]) for dev in devices)
    else:  # older logs: what was held when a batch was formed
        peak = max(int(r.get("buffer_len") or 0) + int(r.get("local_bsz") or 0)
                   + int(r.get("truncated") or 0) for rank in run.train.values() for r in rank)
    seed = run.config.get("seed")
    rows[(run.config.get("policy"), seed)] = (peak, run.summary.get("final_top1"))
lines = ["| Seed | Peak buffer, persistence | Peak buffer, truncation | Ratio | "
         "Final top-1, persistence / truncation (%) |", "|---|---|---|---|---|"]
for seed in sorted({s for _, s in rows}):
    p, t = rows.get(("persistence", seed)), rows.get(("truncation", seed))
    if not (p and t):
        continue
    ratio = f"{p[0] / t[0]:,.0f}x" if t[0] else "n/a"
    lines.append(f"| {seed} | {p[0]:,} | {t[0]:,} | {ratio} | {p[1]:.2f} / {t[1]:.2f} |")
text = ("Peak buffer: the most samples any device's buffer held at any time (largest over "
        "devices):\n\n" + "\n".join(lines) + "\n")
out.write_text(text)
print(text)
EOF
}

# The injection comparison in the paper's terms: final top-1 and top-5 per run.
inject_top5() {  # inject_top5 OUTFILE RUN_DIR...
  PYTHONPATH="$REPO" "$PYTHON" - "$@" <<'EOF'
import sys
from pathlib import Path
from scadles.report import load_run

out, dirs = Path(sys.argv[1]), sys.argv[2:]
lines = ["| Run | alpha = beta | Samples trained | Injected | Final top-1 (%) | "
         "Final top-5 (%) |", "|---|---|---|---|---|---|"]
for d in dirs:
    run = load_run(d)
    s, c = run.summary, run.config
    injected = sum(int(r.get("injected") or 0) for rank in run.train.values() for r in rank)
    lines.append(f"| {Path(d).name} | {c.get('alpha', 0):g} | {s.get('samples', 0):,} | "
                 f"{injected:,} | {s['final_top1']:.2f} | {s['final_top5']:.2f} |")
text = "Final accuracy of each run (the paper reports top-5):\n\n" + "\n".join(lines) + "\n"
out.write_text(text)
print(text)
EOF
}

# Time to accuracy per seed: ScaDLES against the ddp run of the same seed (the same streams),
# and a report per seed (its accuracy plot keeps each seed's own time axis: with S1 the
# slowest stream, and so a ddp step, differs several-fold between seeds).
tta_paired() {  # tta_paired OUT_FOLDER TARGET RUN_DIR...
  local folder="$1" target="$2" seed dir
  shift 2
  local -a pair
  for seed in $(printf '%s\n' "$@" | sed -n 's/.*-seed\([0-9][0-9]*\)$/\1/p' | sort -un); do
    pair=()
    for dir in "$@"; do [[ "$dir" == *-seed$seed ]] && pair+=("$dir"); done
    [ "${#pair[@]}" -eq 2 ] || continue
    PYTHONPATH="$REPO" "$PYTHON" -m scadles.report "${pair[@]}" --out "$folder/seed$seed" \
      --baseline "${pair[1]}" ${target:+--target "$target"} > /dev/null \
      || die "the seed-$seed report of $folder failed"
  done
  PYTHONPATH="$REPO" "$PYTHON" - "$folder/paired.md" "${target:-}" "$@" <<'EOF'
import math, statistics, sys
from pathlib import Path
from scadles.report import default_target, load_run, parse_target, time_to_target

out, target, dirs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
runs = [load_run(d) for d in dirs]
target = parse_target(target) if target else default_target(runs)
by_seed = {}
for run in runs:
    by_seed.setdefault(run.config.get("seed"), {})[run.config.get("mode")] = run
def fmt(t):
    return "not reached" if t is None else f"{t:,.0f}"
def step_at(run, t):
    return next((p["step"] for p in run.evals if p["clock_s"] == t), None)
lines = [f"| Seed | Slowest rate (samples/s) | ScaDLES: time to {100 * target:.0f}% (s), step "
         f"| ddp: time (s), step | Speedup | Final top-1 ScaDLES / ddp (%) |",
         "|---|---|---|---|---|---|"]
speedups = []
for seed in sorted(by_seed):
    pair = by_seed[seed]
    if set(pair) != {"scadles", "ddp"}:
        continue
    s, d = pair["scadles"], pair["ddp"]
    ts, td = time_to_target(s.evals, target), time_to_target(d.evals, target)
    rates = [dev["rate_per_s"] for dev in s.summary.get("devices") or []]
    slowest = f"{min(rates):.1f}" if rates else "?"
    speedup = td / ts if ts and td else None
    if speedup:
        speedups.append(speedup)
    lines.append(f"| {seed} | {slowest} | {fmt(ts)}, {step_at(s, ts) or '-'} | {fmt(td)}, "
                 f"{step_at(d, td) or '-'} | {'n/a' if speedup is None else f'{speedup:.2f}x'} "
                 f"| {s.summary['final_top1']:.2f} / {d.summary['final_top1']:.2f} |")
text = (f"Time to {100 * target:.0f}% top-1 per seed, each ScaDLES run against the ddp run of "
        "the same seed (same streams); per-seed reports in seed*/report.md.\n\n"
        + "\n".join(lines) + "\n")
if speedups:
    geo = math.exp(sum(map(math.log, speedups)) / len(speedups))
    sd = f" ± {statistics.stdev(speedups):.2f}" if len(speedups) > 1 else ""
    text += (f"\nSpeedup over {len(speedups)} seed(s): mean {statistics.mean(speedups):.2f}x"
             f"{sd}, geometric mean {geo:.2f}x, range {min(speedups):.2f}x to "
             f"{max(speedups):.2f}x.\n")
out.write_text(text)
print(text)
EOF
}

if [ "${REPORT_ONLY:-0}" = 1 ]; then
  say "REPORT_ONLY=1: reporting the runs listed in $OUT/*/runs.txt again"
  load_runs
  rm -rf "$OUT/report"
else
  say "writing to $OUT ($RUN_TOTAL runs$( [ "$QUICK" = 1 ] && echo ', QUICK smoke settings'))"
  # Which code made the runs (the index quotes it, also when the reports are redone).
  printf '%s\n' "at commit \`$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)\`$(
    git -C "$REPO" diff --quiet HEAD 2>/dev/null && [ -z "$(git -C "$REPO" status --porcelain \
      2>/dev/null)" ] || echo ' plus uncommitted changes'), started $(date -u '+%Y-%m-%d %H:%M UTC')$(
    [ "$QUICK" = 1 ] && echo ', QUICK=1')" > "$OUT/provenance.txt"
  wanted tta-S10 && run_tta S10
  wanted tta-S1 && run_tta S1
  wanted buffer && run_buffer
  wanted inject && run_inject
  wanted compression && run_compression
  echo "$(( SECONDS - START_S ))" > "$OUT/wall_s.txt"
fi

mkdir -p "$OUT/report"
{
  echo "# ScaDLES at CPU scale: the four comparisons"
  echo
  echo "Made by \`execution_scripts/reproduce_cpu.sh\` $(cat "$OUT/provenance.txt" 2>/dev/null)," \
       "$RUN_TOTAL runs in $(cat "$OUT/wall_s.txt" 2>/dev/null || echo '?') s of wall time;" \
       "runs in \`$OUT\`."
} > "$OUT/report/index.md"
report tta-S10 "ddp-S10" "$TTA_TARGET" \
  "ScaDLES against ddp, $TTA_WORLD IID devices, rates drawn from S10 (normal, mean 64, sd 24)."
report tta-S1 "ddp-S1" "$TTA_TARGET" \
  "ScaDLES against ddp, $TTA_WORLD IID devices, rates drawn from S1 (uniform, mean 38, sd 24)."
report buffer "persistence" "$BUF_TARGET" \
  "Persistence against truncation, $BUF_WORLD devices at $BUF_RATES rates (fast streams)."
report inject "no-injection" "$INJ_TARGET" \
  "$INJ_WORLD one-label devices ($BN_MODEL), without and with injection (alpha = beta = $INJ_SHARE)."
report compression "none" "$COMP_TARGET" \
  "No compression / static Top-k$( [ -n "$COMP_MILD_RATIO" ] && echo " ($COMP_MILD_RATIO and $COMP_RATIO)" || echo " ($COMP_RATIO)") / adaptive Top-$COMP_RATIO (compress when the signal <= $COMP_DELTA), $COMP_WORLD devices, $COMP_RATES, comm model $COMP_LINK."
[ "${REPORT_ONLY:-0}" = 1 ] || say "all $RUN_TOTAL runs done in $(( SECONDS - START_S )) s"
say "report: $OUT/report/index.md (one folder per comparison under $OUT/report/)"
