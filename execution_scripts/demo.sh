#!/usr/bin/env bash
# `make demo`: a short real run. 4 devices stream Fashion-MNIST at rates drawn from the paper's
# S10 distribution through a real (embedded, or KAFKA_BOOTSTRAP's) Kafka broker; 4 ranks
# train a small CNN with ScaDLES on a virtual clock (a modelled step time, so it takes a few
# minutes on 2 CPU cores and gives the same numbers everywhere), then print the summary and,
# last, the one command that makes the run's plots (`make report` runs it for the latest run).
# Every parameter can be overridden from the environment, as in the other scripts.
mode="${MODE:-scadles}"
backend="${BACKEND:-gloo}"
model="${MODEL:-smallcnn}"
dataset="${DATASET:-fashion-mnist}"
partition="${PARTITION:-iid}"
world_size="${WORLD_SIZE:-4}"
rates="${RATES:-S10}"
seed="${SEED:-0}"
lr="${LR:-0.1}"
momentum="${MOMENTUM:-0.9}"
weight_decay="${WEIGHT_DECAY:-1e-4}"
policy="${POLICY:-persistence}"
clock="${CLOCK:-virtual}"
compute_model="${COMPUTE_MODEL:-linear:0.1,0.003}"  # 0.1 s + 3 ms per sample
max_steps="${MAX_STEPS:-600}"
eval_steps="${EVAL_STEPS:-100}"
eval_samples="${EVAL_SAMPLES:-2000}"
source="${SOURCE:-kafka}"
log_dir="${LOG_DIR:-}"

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_scadles "$@"
