#!/bin/sh
# torchrun over every node of a SLURM allocation (a tuning job with resources.tune.nodes > 1):
# one torchrun per node (srun), each starting NPROC processes (one per GPU), all meeting at a c10d
# rendezvous on the allocation's first node. Usage: torchrun_nodes.sh NPROC <torchrun arguments...>
set -eu
nproc="$1"
shift
: "${SLURM_JOB_NODELIST:?torchrun_nodes.sh runs inside a SLURM allocation (no SLURM_JOB_NODELIST)}"
: "${SLURM_NNODES:?torchrun_nodes.sh runs inside a SLURM allocation (no SLURM_NNODES)}"
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
exec srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    torchrun --nnodes="$SLURM_NNODES" --nproc-per-node="$nproc" --rdzv-backend=c10d \
    --rdzv-endpoint="$head:${UNISPARSE_RDZV_PORT:-29500}" --rdzv-id="${SLURM_JOB_ID:-unisparse}" "$@"
