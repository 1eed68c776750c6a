#!/usr/bin/env bash
# ScaDLES on streaming CIFAR-100 (IID) with VGG19 (batch norm): the paper's settings.
# Every parameter can be overridden from the environment (see streamsim_resnet152.sh).
mode="${MODE:-scadles}"
backend="${BACKEND:-mpi}"
model="${MODEL:-vgg19}"
dataset="${DATASET:-cifar100}"
partition="${PARTITION:-iid}"
world_size="${WORLD_SIZE:-10}"
rates="${RATES:-S10}"                    # normal, mean 64, sd 24 samples/s per device
seed="${SEED:-0}"
lr="${LR:-0.01}"
momentum="${MOMENTUM:-0.9}"
weight_decay="${WEIGHT_DECAY:-5e-4}"
gamma="${GAMMA:-0.2}"
milestones="${MILESTONES:-75,150,200}"   # epochs of samples trained by the whole group
policy="${POLICY:-truncation}"
min_train_bsz="${MIN_TRAIN_BSZ:-8}"
max_train_bsz="${MAX_TRAIN_BSZ:-64}"       # the original scripts'; the paper's b_max is 1024
window_s="${WINDOW_S:-1.0}"
clock="${CLOCK:-wall}"
# Virtual clock: a modelled step time of a GPU-class device (0.1 s + 3 ms per sample), so the
# replay does not depend on this machine and is deterministic; COMPUTE_MODEL=measured: real.
compute_model="${COMPUTE_MODEL:-$([ "$clock" = virtual ] && echo linear:0.1,0.003 || echo measured)}"
max_steps="${MAX_STEPS:-20000}"          # about 250 epochs of CIFAR-100 at 10 x 64 samples/s
eval_steps="${EVAL_STEPS:-200}"
eval_samples="${EVAL_SAMPLES:-2000}"     # 0: the whole test split
checkpoint_every="${CHECKPOINT_EVERY:-1000}"
source="${SOURCE:-kafka}"
log_dir="${LOG_DIR:-}"

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_scadles "$@"
