#!/usr/bin/env bash
# The comparison: every algorithm of the suite on the same partition and seed(s), then the
# table (final-round and best-round accuracy, mean ± std over seeds) and the accuracy curves.
# `bash run.sh --help` lists the options.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    cat <<'EOF'
usage: bash run.sh [options] [-- flags for every script]

Runs the algorithms of the registry (engine/registry.py; default: fedavg, fedavgm, fedprox,
moon, scaffold, fednova and fedhug) on one partition and seed(s), then writes the comparison
table and the accuracy-vs-round curves.

options (each also read from the environment variable in capitals; a flag wins):
  --profile default|paper|quick|pfl
                         default: the seed's comparison at the FedHUG paper's setting (70
                         rounds x 100 local iterations, FedHUG from round 50 with a budget of
                         256) with FedHUG's synthesis at --g_steps 25 instead of the paper's
                         500 (25 did as well as 50 over 3 seeds at this setting,
                         docs/fedhug-ablations.md; the job's time on 2 CPU cores: README); paper: the
                         same with --g_steps 500 (FedHUG's 20 synthesis rounds then take
                         hours on a CPU); quick: a smoke test, 15
                         rounds x 25 iterations, FedHUG from round 10 with --g_steps 30 and a
                         budget of 64 (a few minutes; its table says it compares nothing);
                         pfl: the personalised comparison under PFLlib's scenario (--scenario
                         pfllib: merged Dir(0.1) partition of 20 clients, FedAvgCNN, batch 10,
                         lr 0.005, 1 epoch a round, every client scored on its own test
                         split), FedAvg, FedAvg+FT and the personalised family, 20 rounds
                         (about a minute a round and algorithm on one idle core; PFLlib runs
                         2000)
  --dataset NAME         fashionmnist (default), cifar10, cifar100
  --partition NAME       noniid (default), iid, noniid-skew-K; pfllib (the pfl profile's default)
  --model NAME           the model of every script (default: the dataset's, or the pfl
                         profile's fedavgcnn), e.g. simplecnn-mnist
  --beta B               Dirichlet concentration of --partition noniid (default 0.1)
  --n_parties N          number of clients (default 10)
  --seeds "S ..."        seeds (default "0"); each seed is a run of every algorithm
  --rounds R             communication rounds (default: the profile's)
  --iters I              local iterations a round (default: the profile's)
  --start_round R        FedHUG's first synthesis round (default: the profile's)
  --g_steps G            FedHUG's synthesis steps (default: the profile's)
  --budget B             FedHUG's --synthesis_batch_size (default: the profile's)
  --algorithms "A ..."   any names of python main.py --list, e.g. "fedavg fedhug"
                         (default: the seven of the FedHUG paper's table; with the pfl
                         profile FedAvg, FedAvg+FT and the personalised family)
  --workers N            the cores the job uses (default: the CPU cores, at most
                         --n_parties; 1 when a CUDA GPU is present): N runs at a time, each
                         a serial one-thread process; a run that starts when no other is
                         waiting gets the free cores as its --workers, and when a core frees
                         up with no run waiting, the running run with the most time left
                         continues from its checkpoint with the free cores as --workers.
                         Results are identical to running them one by one, serially
  --logroot DIR          output folder (default: log/ beside run.sh)
  --fresh                start this invocation's runs over instead of continuing them
  -h, --help             this text
  -- FLAGS               passed to every script, e.g. -- --eval_every 5

outputs, for the setting S = [<profile>_]<dataset>_<partition>[_beta<B>][_<N>clients][_<model>]
(no profile prefix for the default profile):
  LOGROOT/S/<algorithm>_seed<s>.log   what the script printed (its >> Round lines); run.sh's
                                      stdout is these logs whole, one after the other
  LOGROOT/S/runs/<algorithm>_seed<s>/ its run directory (log.txt, metrics.jsonl, config.yaml,
                                      partition.svg; FedHUG's synthetic.png, drift_budget.png)
  LOGROOT/S/table.md, table.csv, table.tex   final and best accuracy, last-10 mean and std,
                                      MB up and down a round, seconds a round (mean ± std over seeds)
  LOGROOT/S/curves.png                accuracy per round, the last 10 rounds shaded
  LOGROOT/S/partition_seed<s>.svg     the clients' class counts of each seed's partition

FedHUG is FedAvg before --start_round, so when both run, FedHUG continues from FedAvg's
checkpoint after round start_round-1 of the same seed instead of recomputing those rounds
(its log shows FedAvg's round lines for them; tests/test_main_job.py proves the result is
identical to recomputing them).

A run already in LOGROOT/S/runs is continued from its checkpoint (a finished one is only
re-read); one made with other flags (e.g. other --rounds) stops run.sh: use another
--logroot or --fresh. A script that does not exist yet is skipped with a note.

examples:
  bash run.sh                                                     # the seed's table, 30-40 min on 2 cores
  bash run.sh --profile quick                                     # a smoke test, minutes
  bash run.sh --profile paper --seeds "0 1 2" --beta 0.5
  ROUNDS=2 ITERS=5 ALGORITHMS="fedavg fedavgm" LOGROOT=/tmp/log bash run.sh
  bash run.sh --profile pfl --seeds "0 1 2"                       # PFLlib's scenario
  bash run.sh --profile pfl --model simplecnn-mnist --partition noniid   # SimpleCNN, the suite's Dir(0.1)
EOF
}

die() {
    echo "run.sh: $*" >&2
    exit 2
}

# ----------------------------------------------------------------------------- options
KNOWN_ALGORITHMS="$(python3 "$here/engine/registry.py" --names)"   # the registry, read without torch
DEFAULT_ALGORITHMS="fedavg fedavgm fedprox moon scaffold fednova fedhug"
PFL_ALGORITHMS="fedavg fedavg-ft fedper fedrep lgfedavg ditto perfedavg fedala fedcp gpfl feddbe"
extra_flags=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --fresh) FRESH=1; shift; continue ;;
        --) shift; extra_flags=("$@"); break ;;
    esac
    option="${1%%=*}"
    case "$option" in
        --profile) variable=PROFILE ;;
        --dataset) variable=DATASET ;;
        --partition) variable=PARTITION ;;
        --model) variable=MODEL ;;
        --beta) variable=BETA ;;
        --n_parties) variable=N_PARTIES ;;
        --seeds) variable=SEEDS ;;
        --rounds) variable=ROUNDS ;;
        --iters) variable=ITERS ;;
        --start_round) variable=START_ROUND ;;
        --g_steps) variable=G_STEPS ;;
        --budget) variable=BUDGET ;;
        --algorithms) variable=ALGORITHMS ;;
        --workers) variable=WORKERS ;;
        --logroot) variable=LOGROOT ;;
        -*) die "unknown option '$option' (see bash run.sh --help)" ;;
        *) die "unexpected argument '$1' (options start with --; see bash run.sh --help)" ;;
    esac
    if [[ "$1" == *=* ]]; then
        value="${1#*=}"; shift
    else
        [ $# -ge 2 ] || die "$option needs a value (see bash run.sh --help)"
        value="$2"; shift 2
    fi
    [ -n "$value" ] || die "$option needs a value (see bash run.sh --help)"
    printf -v "$variable" '%s' "$value"
done

PROFILE="${PROFILE:-default}"
case "$PROFILE" in
    default) profile_rounds=70 profile_iters=100 profile_start_round=50 profile_g_steps=25 profile_budget=256 ;;
    quick) profile_rounds=15 profile_iters=25 profile_start_round=10 profile_g_steps=30 profile_budget=64 ;;
    paper) profile_rounds=70 profile_iters=100 profile_start_round=50 profile_g_steps=500 profile_budget=256 ;;
    pfl) profile_rounds=20 profile_iters=100 profile_start_round=0 profile_g_steps=30 profile_budget=64
         DEFAULT_ALGORITHMS="$PFL_ALGORITHMS" PARTITION="${PARTITION:-pfllib}" N_PARTIES="${N_PARTIES:-20}" ;;
    *) die "unknown profile '$PROFILE'; choose default, paper, quick or pfl" ;;
esac
DATASET="${DATASET:-fashionmnist}"
PARTITION="${PARTITION:-noniid}"
BETA="${BETA:-0.1}"
N_PARTIES="${N_PARTIES:-10}"
MODEL="${MODEL:-}"
SEEDS="${SEEDS:-0}"
ROUNDS="${ROUNDS:-$profile_rounds}"
ITERS="${ITERS:-$profile_iters}"
START_ROUND="${START_ROUND:-$profile_start_round}"
G_STEPS="${G_STEPS:-$profile_g_steps}"
BUDGET="${BUDGET:-$profile_budget}"
ALGORITHMS="${ALGORITHMS:-$DEFAULT_ALGORITHMS}"
LOGROOT="${LOGROOT:-$here/log}"
[[ "$LOGROOT" == /* ]] || LOGROOT="$PWD/$LOGROOT"      # relative to where run.sh was called from
FRESH="${FRESH:-0}"

if [ -z "${WORKERS:-}" ]; then                 # every core, unless a CUDA GPU runs the clients
    WORKERS="$(nproc 2>/dev/null || echo 1)"
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && WORKERS=1
    [[ "$N_PARTIES" =~ ^[0-9]+$ ]] && [ "$WORKERS" -gt "$N_PARTIES" ] && WORKERS="$N_PARTIES"
fi
for name in N_PARTIES ROUNDS ITERS START_ROUND G_STEPS BUDGET WORKERS; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || die "$name must be a whole number (got '${!name}')"
done
[ -n "${SEEDS// /}" ] || die "SEEDS is empty; give one or more whole numbers, e.g. \"0 1 2\""
[ "$WORKERS" -ge 1 ] || die "WORKERS must be at least 1 (got '$WORKERS')"
for seed in $SEEDS; do
    [[ "$seed" =~ ^[0-9]+$ ]] || die "seeds must be whole numbers (got '$seed' in SEEDS=\"$SEEDS\")"
done
[ -n "${ALGORITHMS// /}" ] || die "ALGORITHMS is empty; choose from: $KNOWN_ALGORITHMS"
for algorithm in $ALGORITHMS; do
    [[ " $KNOWN_ALGORITHMS " == *" $algorithm "* ]] || die "unknown algorithm '$algorithm'; choose from: $KNOWN_ALGORITHMS"
done

# ----------------------------------------------------------------------------- set-up
source "$here/setup.sh"
cd "$here"

setting="${DATASET}_${PARTITION}"
[ "$PARTITION" = noniid ] && setting+="_beta${BETA}"
[ "$N_PARTIES" = 10 ] || setting+="_${N_PARTIES}clients"
[ -n "$MODEL" ] && setting+="_${MODEL}"
[ "$PROFILE" = default ] || setting="${PROFILE}_${setting}"     # each profile's runs in their own folder
out="$LOGROOT/$setting"
mkdir -p "$out/runs"

common_flags=(--dataset "$DATASET" --partition "$PARTITION" --beta "$BETA" --n_parties "$N_PARTIES"
              --sample_fraction 1.0 --num_local_iterations "$ITERS" --comm_round "$ROUNDS")
[ "$PROFILE" = pfl ] && common_flags=(--scenario pfllib "${common_flags[@]}")     # its batch, lr, epochs, eval
[ -n "$MODEL" ] && common_flags+=(--model "$MODEL")

# The script and the flags that make each algorithm come from the registry (its own flags'
# defaults are those of the published command lines); the profile adds FedHUG's schedule.
algorithm_command() {
    python3 "$here/engine/registry.py" --command "$1"
    if [ "$1" = fedhug ]; then
        printf '%s\n' --start_round "$START_ROUND" --g_steps "$G_STEPS" --synthesis_batch_size "$BUDGET"
    fi
}

# FedHUG is FedAvg before --start_round: with both in the list, FedAvg keeps its checkpoint
# after round START_ROUND-1 (and every client's model, FedHUG's drift reference) and FedHUG
# continues from it.
warm_fedhug=0
if [[ " $ALGORITHMS " == *" fedhug "* && " $ALGORITHMS " == *" fedavg "* ]] \
        && [ "$START_ROUND" -gt 0 ] && [ "$START_ROUND" -le "$ROUNDS" ]; then
    warm_fedhug=1
fi
snapshot_round=$((START_ROUND - 1))

case "$PROFILE" in
    pfl) title="profile pfl (--scenario pfllib), $ROUNDS rounds x 1 epoch" ;;
    quick) title="SMOKE TEST (profile quick: $ROUNDS rounds x $ITERS local iterations, FedHUG from round $START_ROUND with $G_STEPS synthesis steps): far from convergence, it compares nothing; bash run.sh gives the real table" ;;
    *) title="profile $PROFILE: $ROUNDS rounds x $ITERS local iterations, FedHUG from round $START_ROUND with $G_STEPS synthesis steps and a budget of $BUDGET" ;;
esac
echo "run.sh: $title; setting $setting, seeds $SEEDS, $WORKERS run(s) at a time, output $out"
if [[ " $ALGORITHMS " == *" fedhug "* ]] && [ "$START_ROUND" -ge "$ROUNDS" ]; then
    echo "run.sh: note: FedHUG starts synthesis at round $START_ROUND >= $ROUNDS rounds, so it runs as FedAvg (set START_ROUND)"
fi

# The runs go into a job file; engine/jobs.py runs them, one per core (each serial, one thread:
# the same numbers as any --workers), FedHUG as soon as FedAvg's checkpoint is there, with one
# progress bar on the terminal and each run's log on stdout whole, one after the other.
job_file="$out/job.jsonl"
rm -f "$job_file"
for seed in $SEEDS; do
    for algorithm in $ALGORITHMS; do
        mapfile -t command < <(algorithm_command "$algorithm")
        if [ ! -f "${command[0]}" ]; then
            echo "run.sh: note: ${command[0]} does not exist yet; skipping $algorithm"
            continue
        fi
        name="${algorithm}_seed${seed}"
        log="$out/$name.log"
        run_dir="$out/runs/$name"
        if [ "$FRESH" = 1 ]; then
            rm -rf "$run_dir" "$log"
        fi
        resume=() resumed=()
        if [ -f "$run_dir/checkpoint.pt" ]; then
            resume=(--resume "$run_dir") resumed=(--resumed)   # continue it (a finished run is only re-read)
        elif [ -d "$run_dir" ]; then
            rm -rf "$run_dir"                    # no round finished: nothing to keep
        fi
        warm=() job_options=(--units "$ROUNDS")
        if [ "$warm_fedhug" = 1 ] && [ "$algorithm" = fedavg ]; then
            warm=(--keep_client_models --snapshot_rounds "$snapshot_round")
        elif [ "$warm_fedhug" = 1 ] && [ "$algorithm" = fedhug ]; then
            if [ ${#resume[@]} -gt 0 ] && grep -q "^warm start: rounds" "$run_dir/log.txt" 2>/dev/null; then
                job_options=(--units $((ROUNDS - START_ROUND)))     # a warm-started run, continued
            elif [ ${#resume[@]} -eq 0 ]; then
                job_options+=(--after "fedavg_seed${seed}" --warm_units $((ROUNDS - START_ROUND))
                              --warm_start "$out/runs/fedavg_seed${seed}/checkpoint_round${snapshot_round}.pt")
            fi
        fi
        python3 -m engine.jobs add "$job_file" --name "$name" --log "$log" --run_dir "$run_dir" \
            "${job_options[@]}" "${resumed[@]}" -- python -u "${command[@]}" "${common_flags[@]}" \
            --init_seed "$seed" --logdir "$out/runs" --log_file_name "$name" "${resume[@]}" "${warm[@]}" \
            "${extra_flags[@]}"
    done
done

started=$SECONDS
status=0
[ -f "$job_file" ] && { python3 -m engine.jobs run "$job_file" --cores "$WORKERS" || status=$?; }
[ "$status" -eq 2 ] && exit 2                  # a run refused its flags (engine/jobs.py said which)
if [ "$status" -eq 130 ]; then
    echo "run.sh: interrupted; bash run.sh again continues from the checkpoints" >&2
    exit 130
fi
for seed in $SEEDS; do
    for algorithm in $ALGORITHMS; do
        run_dir="$out/runs/${algorithm}_seed${seed}"
        [ -f "$run_dir/partition.svg" ] && [ ! -f "$out/partition_seed${seed}.svg" ] \
            && cp "$run_dir/partition.svg" "$out/partition_seed${seed}.svg"
        if [ "$algorithm" = fedhug ] && [ -f "$run_dir/metrics.jsonl" ]; then
            python plot_run.py "$run_dir" || true
        fi
    done
done

# ----------------------------------------------------------------------------- results
if compgen -G "$out/*.log" >/dev/null; then
    echo
    python tables.py "$out" --title "$title" --output "$out/table.md"
    python tables.py "$out" --format csv --output "$out/table.csv" >/dev/null
    python tables.py "$out" --format latex --title "$title" --output "$out/table.tex" >/dev/null
    python plot_curves.py "$out" -o "$out/curves.png"
    echo "run.sh: tables $out/table.md (.csv, .tex), curves $out/curves.png"
else
    echo "run.sh: no logs in $out, so no table"
fi
elapsed=$((SECONDS - started))
echo "run.sh: elapsed $((elapsed / 60)) min $((elapsed % 60)) s"
exit "$status"                                 # 1 when a run failed (engine/jobs.py listed it)
