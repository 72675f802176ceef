#!/usr/bin/env bash
# the privacy probe across algorithms, small CPU budget (docs/hyperfl-privacy-results.md)
cd "$(dirname "$0")/../.."
P="--privacy_rounds 1 --privacy_clients 0 --privacy_batch_sizes 1,4 --privacy_attacks ig,idlg --privacy_modes probe --privacy_preset library --privacy_iterations 500 --privacy_dlg_iterations 50 --threads 1 --logdir log/privacy-probe"
B="--comm_round 2 --num_local_iterations 10"
run() { .venv/bin/python "$@" $P > /dev/null 2>&1 || echo "failed: $*"; }
run fedavg.py $B --log_file_name fedavg &
run fedprox.py $B --log_file_name fedprox
wait
run moon.py $B --log_file_name moon &
run scaffold.py $B --log_file_name scaffold
wait
run fedhug.py $B --start_round 0 --g_steps 20 --log_file_name fedhug &
run hyperfl.py --scenario hyperfl --n_parties 5 --epochs 1 --comm_round 2 --log_file_name hyperfl   # oracle classifier
wait
.venv/bin/python privacy.py log/privacy-probe -o log/privacy-probe/table
