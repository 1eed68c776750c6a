#!/usr/bin/env bash
# ScaDLES with static Top-k compression (1% of each layer kept) on CIFAR-10 IID, ResNet152.
# Every parameter can be overridden from the environment (see streamsim_resnet152.sh), e.g.
#   BACKEND=gloo MODEL=resnet18 DATASET=fashion-mnist WORLD_SIZE=4 MAX_STEPS=10 CLOCK=virtual \
#   LOG_DIR=/tmp/run bash execution_scripts/staticcompression_resnet152.sh
# Uses the embedded broker unless KAFKA_BOOTSTRAP is set; see common.sh for the rest.
mode="${MODE:-scadles}"
backend="${BACKEND:-mpi}"
model="${MODEL:-resnet152}"
dataset="${DATASET:-cifar10}"
partition="${PARTITION:-iid}"
world_size="${WORLD_SIZE:-10}"
rates="${RATES:-S10}"
rate_schedule="${RATES_SCHEDULE:-constant}"
seed="${SEED:-0}"
lr="${LR:-0.1}"
momentum="${MOMENTUM:-0.9}"
weight_decay="${WEIGHT_DECAY:-1e-4}"
gamma="${GAMMA:-0.2}"
milestones="${MILESTONES:-75,150,225}"   # epochs of samples trained by the whole group
policy="${POLICY:-persistence}"
min_train_bsz="${MIN_TRAIN_BSZ:-8}"
max_train_bsz="${MAX_TRAIN_BSZ:-64}"       # the original scripts'; the paper's b_max is 1024
window_s="${WINDOW_S:-1.0}"
compression="${COMPRESSION:-static}"
compression_ratio="${COMPRESSION_RATIO:-0.01}"
delta_threshold="${DELTA_THRESHOLD:-0.3}"
adaptive_signal="${ADAPTIVE_SIGNAL:-paper}"
alpha="${ALPHA:-0}"
beta="${BETA:-0}"
clock="${CLOCK:-wall}"
compute_model="${COMPUTE_MODEL:-measured}"
max_steps="${MAX_STEPS:-24000}"
eval_steps="${EVAL_STEPS:-200}"
eval_samples="${EVAL_SAMPLES:-2000}"     # 0: the whole test split
checkpoint_every="${CHECKPOINT_EVERY:-1000}"
source="${SOURCE:-kafka}"
log_dir="${LOG_DIR:-}"

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_scadles "$@"
