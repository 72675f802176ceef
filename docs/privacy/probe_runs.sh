#!/usr/bin/env bash
# The privacy table of docs/hyperfl-privacy-results.md: probe attacks on every algorithm's upload
# (3 seeds, clients 0-2 at round 1, B 1 and 4, IG and iDLG) and realistic-mode IG on the actual
# uploads (seed 0, clients 0-2, 8 dummy images), two one-thread runs at a time (~35 min on 2 cores).
#   bash docs/privacy/probe_runs.sh [OUTDIR]       (default log/privacy)
cd "$(dirname "$0")/../.."
OUT=${1:-log/privacy}
PY=.venv/bin/python
PROBE="--privacy_rounds 1 --privacy_clients 0,1,2 --privacy_batch_sizes 1,4 --privacy_attacks ig,idlg"
PROBE="$PROBE --privacy_modes probe --privacy_preset library --privacy_iterations 1000 --privacy_dlg_iterations 50"
REALISTIC="--privacy_rounds 1 --privacy_clients 0,1,2 --privacy_batch_sizes 8 --privacy_attacks ig"
REALISTIC="$REALISTIC --privacy_modes realistic --privacy_preset library --privacy_iterations 500"
SUITE="--comm_round 2 --num_local_iterations 10"        # Fashion-MNIST Dir(0.5), 10 clients
{
  for seed in 0 1 2; do
    for a in fedavg fedprox moon scaffold ditto; do
      echo "main.py --algorithm $a $SUITE --init_seed $seed $PROBE --logdir $OUT/probe --log_file_name ${a}_seed$seed"
    done
    echo "main.py --algorithm fedper --eval local $SUITE --init_seed $seed $PROBE --logdir $OUT/probe --log_file_name fedper_seed$seed"
    echo "fedhug.py $SUITE --start_round 0 --g_steps 20 --init_seed $seed $PROBE --logdir $OUT/probe --log_file_name fedhug_seed$seed"
    echo "hyperfl.py --scenario hyperfl --n_parties 5 --epochs 1 --comm_round 2 --init_seed $seed $PROBE --logdir $OUT/probe --log_file_name hyperfl_seed$seed"
  done
  for a in fedavg fedprox moon scaffold; do
    echo "main.py --algorithm $a $SUITE --init_seed 0 $REALISTIC --logdir $OUT/realistic --log_file_name ${a}_seed0"
  done
} | xargs -P 2 -I{} sh -c "$PY {} --threads 1 > /dev/null 2>&1 || echo 'failed: {}'"
$PY privacy.py $OUT/probe $OUT/realistic -o $OUT/table
