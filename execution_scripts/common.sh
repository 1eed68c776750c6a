# Shared logic of the execution scripts; sourced by each script after it sets its parameters.
#
# A script sets lowercase parameters, each overridable from its UPPERCASE environment
# variable (backend="${BACKEND:-mpi}"), then runs `run_scadles "$@"`. This file:
#   - fills every parameter a script leaves unset from the environment (e.g. EVAL_STEPS),
#   - with a fixed rate list and RATES not given, takes the first WORLD_SIZE rates (cycling
#     when the list is shorter) and says so,
#   - names the log folder after model, method and key settings under <repo>/logs/ (unless
#     LOG_DIR is set),
#   - runs `python -m scadles.launch` with the venv's Python. The launcher starts the embedded
#     broker unless KAFKA_BOOTSTRAP is set, the producer and the ranks, and stops all of them
#     on exit, failure or Ctrl-C.
# Extra launcher flags: pass them to the script (`bash streamsim_vgg19.sh --eval-steps 10`)
# or in EXTRA_ARGS. Booleans: RESUME=1, DOWNLOAD=1, ERROR_FEEDBACK=0, STEP_WHEN_FULL=1,
# TENSORBOARD=1 (any other value is one line and exit 2, as the launcher treats a bad flag).
# An external Kafka: KAFKA_BOOTSTRAP=HOST:PORT, KAFKA_CONFIG=FILE (client settings: SASL/SSL),
# REPLICATION_FACTOR=N.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"

# parameter:flag, in the order they are passed.
SCADLES_PARAMS=(
  mode:--mode backend:--backend model:--model-name dataset:--dataset data_dir:--data-dir
  image_size:--image-size partition:--partition world_size:--world-size
  devices_per_rank:--devices-per-rank seed:--seed
  rates:--rates rate_schedule:--rate-schedule arrivals:--arrivals duration_s:--duration-s
  source:--source topic_prefix:--topic-prefix kafka_config:--kafka-config
  replication_factor:--replication-factor
  lr:--lr momentum:--momentum weight_decay:--weight-decay gamma:--gamma milestones:--milestones
  global_bsz:--global-bsz train_bsz:--train-bsz min_train_bsz:--min-train-bsz
  max_train_bsz:--max-train-bsz window_s:--window-s policy:--policy
  buffer_capacity:--buffer-capacity warmup_epochs:--warmup-epochs max_lr:--max-lr
  clock:--clock compute_model:--compute-model comm_model:--comm-model max_steps:--max-steps
  max_stream_s:--max-stream-s stream_delay_s:--stream-delay-s
  eval_steps:--eval-steps eval_every_s:--eval-every-s eval_samples:--eval-samples checkpoint_every:--checkpoint-every
  log_dir:--log-dir
  compression:--compression compression_ratio:--compression-ratio
  delta_threshold:--delta-threshold adaptive_signal:--adaptive-signal ewma_alpha:--ewma-alpha
  gradnorm_threshold:--gradnorm-threshold gradnorm_interval:--gradnorm-interval
  alpha:--alpha beta:--beta inject_from:--inject-from pool_topic:--pool-topic
  inject_weight:--inject-weight
)

_is_rate_list() {  # a plain list of numbers (comma- or space-separated)
  local token
  for token in ${1//,/ }; do
    [[ "$token" =~ ^[0-9]+([.][0-9]*)?$ ]] || return 1
  done
  [ -n "${1// /}" ]
}

_fit_rates_to_world_size() {  # one rate per device: WORLD_SIZE x DEVICES_PER_RANK
  if [ -n "${RATES:-}" ] || ! _is_rate_list "$rates"; then
    return
  fi
  local -a list out
  local devices=$(( world_size * ${devices_per_rank:-1} ))
  read -ra list <<< "${rates//,/ }"
  if [ "${#list[@]}" -eq "$devices" ]; then
    return
  fi
  local i
  for ((i = 0; i < devices; i++)); do
    out+=("${list[i % ${#list[@]}]}")
  done
  local how="the first $devices"
  [ "$devices" -gt "${#list[@]}" ] && how="$devices (cycling the list)"
  echo "common.sh: $devices devices (WORLD_SIZE x DEVICES_PER_RANK) but the script lists" \
       "${#list[@]} rates: using $how: ${out[*]}" >&2
  rates="$(IFS=,; echo "${out[*]}")"
}

_default_log_dir() {
  local rates_label="${rates//[^A-Za-z0-9.]/-}"
  if _is_rate_list "$rates"; then
    rates_label="rates$(printf '%s' "$rates" | cksum | cut -c1-6)"
  fi
  local name="${model}_${mode}_${dataset}_${partition:-iid}_w${world_size}_${rates_label:0:24}"
  name+="_${policy:-persistence}_${compression:-none}"
  [ "${alpha:-0}" != "0" ] && name+="_inject${alpha}-${beta:-0}"
  name+="_${backend}_${clock:-wall}_$(date +%Y%m%d-%H%M%S)"
  echo "$REPO/logs/${name//:/-}"
}

_check_boolean() {  # NAME: a boolean setting is 0, 1 or unset
  case "${!1:-}" in
    ""|0|1) ;;
    *) echo "config error: $1=${!1}: set it to 1 or 0 (or unset it)" >&2; exit 2 ;;
  esac
}

run_scadles() {
  local pair name env_name
  for name in RESUME DOWNLOAD ERROR_FEEDBACK STEP_WHEN_FULL TENSORBOARD; do
    _check_boolean "$name"
  done
  for pair in "${SCADLES_PARAMS[@]}"; do  # parameters the script left unset: environment
    name="${pair%%:*}"
    env_name="${name^^}"
    if [ -z "${!name:-}" ] && [ -n "${!env_name:-}" ]; then
      printf -v "$name" '%s' "${!env_name}"
    fi
  done
  if [ -z "${rate_schedule:-}" ] && [ -n "${RATES_SCHEDULE:-}" ]; then
    rate_schedule="$RATES_SCHEDULE"
  fi
  _fit_rates_to_world_size
  if [ -z "${log_dir:-}" ]; then
    log_dir="$(_default_log_dir)"
  fi

  local -a args=()
  local flag
  for pair in "${SCADLES_PARAMS[@]}"; do
    name="${pair%%:*}"
    flag="${pair#*:}"
    if [ -n "${!name:-}" ]; then
      args+=("$flag" "${!name}")
    fi
  done
  [ "${RESUME:-0}" = 1 ] && args+=(--resume)
  [ "${DOWNLOAD:-0}" = 1 ] && args+=(--download)
  [ "${ERROR_FEEDBACK:-${error_feedback:-1}}" = 0 ] && args+=(--no-error-feedback)
  [ "${STEP_WHEN_FULL:-${step_when_full:-0}}" = 1 ] && args+=(--step-when-full)
  [ "${TENSORBOARD:-${tensorboard:-0}}" = 1 ] && args+=(--tensorboard)
  local -a extra=()
  [ -n "${EXTRA_ARGS:-}" ] && read -ra extra <<< "$EXTRA_ARGS"

  cd "$REPO"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  exec "$PYTHON" -m scadles.launch "${args[@]}" "${extra[@]}" "$@"
}
