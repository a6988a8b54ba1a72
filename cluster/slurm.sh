#!/bin/bash
# Slurm -> Ray -> distca: start a Ray head on the first node of the allocation and a Ray worker
# on every other node, then submit `distca train` as a Ray job and wait for it.
#   sbatch cluster/slurm.sh recipes/llama3-8b-128k.yaml trainer.run_dir=/shared/runs/llama3
# Run it from the repository root on shared storage: Ray starts on every node in that directory,
# so the job reads the recipe there and a relative trainer.run_dir (default runs/...) is on the
# storage every node writes its checkpoint shard to. `distca` is taken from the environment of
# $RAY (set RAY=/path/to/venv/bin/ray when it is not on PATH).
#SBATCH --job-name=distca
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=distca-%j.log
set -euo pipefail

RECIPE=${1:?usage: sbatch cluster/slurm.sh RECIPE [key=value ...]}
shift
RAY=${RAY:-ray}  # the ray CLI of the environment distca is installed in
RAY=$(command -v "$RAY") || { echo "error: no ray CLI ($RAY); set RAY=/path/to/bin/ray" >&2; exit 2; }
DISTCA=$(dirname "$RAY")/distca  # the job's driver: the same environment as Ray's workers
[ -x "$DISTCA" ] || { echo "error: $DISTCA not found: install distca beside $RAY" >&2; exit 2; }
GCS_PORT=6379
DASHBOARD_PORT=8265
GPUS_PER_NODE=8
cd "${SLURM_SUBMIT_DIR:-.}"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "$HEAD" hostname --ip-address | awk '{print $1}')
echo "ray head: $HEAD ($HEAD_IP), ${#NODES[@]} nodes"

# Ray's token authentication: every node (srun passes the environment on) and the job
# submission below share a fresh token; the dashboard listens on the head's cluster address
# only. Whoever reaches the job API runs code, so without the token it is refused.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export RAY_AUTH_TOKEN

# --cpus-per-task again on srun: Slurm 22.05-23.02 steps do not inherit it from sbatch
srun --nodes=1 --ntasks=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" -w "$HEAD" \
  "$RAY" start --head --node-ip-address="$HEAD_IP" --port=$GCS_PORT \
  --dashboard-host="$HEAD_IP" --dashboard-port=$DASHBOARD_PORT \
  --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus=$GPUS_PER_NODE --block &
sleep 10

for node in "${NODES[@]:1}"; do
  srun --nodes=1 --ntasks=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" -w "$node" \
    "$RAY" start --address="$HEAD_IP:$GCS_PORT" \
    --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus=$GPUS_PER_NODE --block &
done

# Wait until every node's GPUs have joined (a job submitted earlier cannot place its ranks).
want=$(( ${#NODES[@]} * GPUS_PER_NODE ))
have=0
for _ in $(seq 120); do
  have=$("$RAY" status --address "$HEAD_IP:$GCS_PORT" 2>/dev/null \
    | awk '$2 == "GPU" && $1 ~ /\// {split($1, a, "/"); print int(a[2]); exit}') || true
  [ "${have:-0}" -ge "$want" ] && break
  sleep 5
done
if [ "${have:-0}" -lt "$want" ]; then
  echo "error: only ${have:-0} of $want GPUs joined the Ray cluster in 10 minutes" >&2
  exit 1
fi

# No --working-dir: the job runs in this (shared) directory, like the Ray workers; an uploaded
# copy would put a relative trainer.run_dir in a node-local temporary directory.
"$RAY" job submit --address "http://$HEAD_IP:$DASHBOARD_PORT" -- \
  "$DISTCA" train "$RECIPE" "$@"
