#!/usr/bin/env bash
# The runs of docs/fedf2dg-results.md: FedF2DG (feature-statistics prior on SimpleCNN, BatchNorm
# prior on its BN variant) beside FedAvg, SCAFFOLD and FedHUG on Fashion-MNIST Dir(0.05) and
# Dir(0.1), 10 clients all sampled every round, 3 seeds, 33 rounds of 30 local steps (FedF2DG:
# 30 pre-training rounds, 1 distillation round, 2 Rcompete rounds; FedHUG: synthesis from round 30).
# About 45 minutes on 2 CPU cores. Then: python docs/fedf2dg/tables.py log/fedf2dg
#   bash docs/fedf2dg/runs.sh [OUT]      (OUT defaults to log/fedf2dg)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f .venv/bin/activate ] && source .venv/bin/activate      # the environment setup.sh made
OUT=${1:-log/fedf2dg}
GRID=(--seeds 0 1 2 --betas 0.05 0.1 --partition noniid --jobs 2)
COMMON=(--n_parties 10 --sample_fraction 1 --num_local_iterations 30 --comm_round 33)
F2DG=(--pretrain_rounds 30 --iters_mi 200 --inversion_batch_size 32 --num_batch 3 --kd_epochs 10)
python sweep.py --algorithms fedf2dg "${GRID[@]}" --out "$OUT/features" -- "${COMMON[@]}" "${F2DG[@]}" --prior features
python sweep.py --algorithms fedf2dg "${GRID[@]}" --out "$OUT/bn" -- "${COMMON[@]}" "${F2DG[@]}" \
    --model simplecnn-mnist-bn --prior bn
python sweep.py --algorithms fedavg scaffold "${GRID[@]}" --out "$OUT/baselines" -- "${COMMON[@]}"
python sweep.py --algorithms fedhug "${GRID[@]}" --out "$OUT/baselines" -- "${COMMON[@]}" \
    --start_round 30 --g_steps 50 --synthesis_batch_size 256
