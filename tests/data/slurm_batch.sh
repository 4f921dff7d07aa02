#!/bin/bash
# UGRO job exp1_20260101_120000: one torchrun per node, c10d rendezvous on the first node.
#SBATCH --job-name=exp1_20260101_120000
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --partition=gpu
#SBATCH --account=ml-lab
#SBATCH --qos=normal
#SBATCH --time=1-00:00:00
cd "$HOME"/ugro || exit 1
module load cuda/12.4
export NCCL_DEBUG=INFO
export UGRO_JOB_ID=exp1_20260101_120000
export WANDB_NOTES='a b'
UGRO_RDZV_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
UGRO_RDZV_HOST=$(scontrol show node -o "$UGRO_RDZV_NODE" | sed -n "s/.* NodeAddr=\([^ ]*\).*/\1/p")
UGRO_RDZV_HOST=${UGRO_RDZV_HOST:-$UGRO_RDZV_NODE}
UGRO_RDZV_PORT=$("$HOME"/ugro/.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])') || exit 1
export UGRO_RDZV_NODE UGRO_RDZV_HOST UGRO_RDZV_PORT
echo "ugro: $SLURM_JOB_NODELIST, rendezvous $UGRO_RDZV_HOST:$UGRO_RDZV_PORT"
srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --gres=gpu:4 bash -c 'n=$SLURMD_NODENAME; d=$1/nodes/$n
mkdir -p "$d" || exit 1
addr=$(scontrol show node -o "$n" | sed -n "s/.* NodeAddr=\([^ ]*\).*/\1/p"); addr=${addr:-$n}
is_host=0; [ "$n" = "$UGRO_RDZV_NODE" ] && is_host=1
export UGRO_NODE=$n
trap : TERM INT
"$HOME"/ugro/.venv/bin/python -m torch.distributed.run --nnodes "$SLURM_NNODES" --nproc-per-node 4 --max-restarts 0 --tee 3 --log-dir "$d/torchrun" --rdzv-backend c10d --rdzv-endpoint "$UGRO_RDZV_HOST:$UGRO_RDZV_PORT" --rdzv-id exp1_20260101_120000 --rdzv-conf "is_host=$is_host" --local-addr "$addr" scripts/train.py --epochs 3 --note '"'"'it'"'"'"'"'"'"'"'"'s fine'"'"' >"$d/output.log" 2>&1 </dev/null
c=$?
echo $c >"$d/exit_code.tmp" && mv "$d/exit_code.tmp" "$d/exit_code"
printf "\n\036UGRO_EXIT %s\n" $c >>"$d/output.log"
exit $c' ugro-node /shared/ugro/exp1_20260101_120000
