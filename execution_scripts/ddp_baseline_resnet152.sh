#!/usr/bin/env bash
# The conventional synchronous-SGD baseline (the paper's "DDL") on the streams of
# streamsim_resnet152.sh: a fixed batch of 64 per device, every device waits for it (so the
# slowest stream sets the pace), equal weights, no learning-rate scaling.
# Every parameter can be overridden from the environment (see streamsim_resnet152.sh).
mode="${MODE:-ddp}"
backend="${BACKEND:-mpi}"
model="${MODEL:-resnet152}"
dataset="${DATASET:-cifar10}"
partition="${PARTITION:-iid}"
world_size="${WORLD_SIZE:-10}"
rates="${RATES:-S10}"                    # normal, mean 64, sd 24 samples/s per device
seed="${SEED:-0}"
lr="${LR:-0.1}"                         # the paper trains ResNet152 at 0.1
momentum="${MOMENTUM:-0.9}"
weight_decay="${WEIGHT_DECAY:-1e-4}"
gamma="${GAMMA:-0.1}"
milestones="${MILESTONES:-75,150,225}"   # epochs of samples trained by the whole group
train_bsz="${TRAIN_BSZ:-64}"
clock="${CLOCK:-wall}"
# Virtual clock: a modelled step time of a GPU-class device (0.1 s + 3 ms per sample), so the
# replay does not depend on this machine and is deterministic; COMPUTE_MODEL=measured: real.
compute_model="${COMPUTE_MODEL:-$([ "$clock" = virtual ] && echo linear:0.1,0.003 || echo measured)}"
max_steps="${MAX_STEPS:-24000}"
eval_steps="${EVAL_STEPS:-200}"
eval_samples="${EVAL_SAMPLES:-2000}"     # 0: the whole test split
checkpoint_every="${CHECKPOINT_EVERY:-1000}"
source="${SOURCE:-kafka}"
log_dir="${LOG_DIR:-}"

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_scadles "$@"
