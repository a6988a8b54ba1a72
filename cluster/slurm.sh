#!/bin/bash
# Slurm -> Ray -> distca: start a Ray head on the first node of the allocation and a Ray worker
# on every other node, then submit `distca train` as a Ray job and wait for it.
#   sbatch cluster/slurm.sh recipes/llama3-8b-128k.yaml trainer.run_dir=/shared/runs/llama3
# Run it from the repository root on shared storage (the job and every node see the same
# checkout and trainer.run_dir).
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
GCS_PORT=6379
DASHBOARD_PORT=8265

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "$HEAD" hostname --ip-address | awk '{print $1}')
echo "ray head: $HEAD ($HEAD_IP), ${#NODES[@]} nodes"

srun --nodes=1 --ntasks=1 -w "$HEAD" \
  "$RAY" start --head --node-ip-address="$HEAD_IP" --port=$GCS_PORT \
  --dashboard-host=0.0.0.0 --dashboard-port=$DASHBOARD_PORT \
  --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus=8 --block &
sleep 15

for node in "${NODES[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$node" \
    "$RAY" start --address="$HEAD_IP:$GCS_PORT" \
    --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus=8 --block &
done
sleep 15

"$RAY" job submit --address "http://$HEAD_IP:$DASHBOARD_PORT" \
  --working-dir . -- distca train "$RECIPE" "$@"
