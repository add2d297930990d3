#!/bin/bash
# Multi-node DDP with torchrun: run this on every node (same arguments, NODE_RANK differs).
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 NPROC=4 workflows/torchrun.sh experiment=grf run_name=grf1
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=1 NPROC=4 workflows/torchrun.sh experiment=grf run_name=grf1
# torchrun starts the processes; Lightning reads the torchelastic environment. Give a fixed
# run_name so every process (and a later `resume=auto`) uses the same run directory.
# On one machine without GPUs (a test): NNODES=2 NPROC=1 ACCEL=cpu, two shells, NODE_RANK 0 and 1.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC=${NPROC:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
ACCEL=${ACCEL:-auto}

exec torchrun --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC" \
    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
    -m scidiff.cli.train trainer=ddp_multinode trainer.accelerator="$ACCEL" \
    trainer.num_nodes="$NNODES" trainer.devices="$NPROC" "$@"
