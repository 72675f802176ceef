#!/usr/bin/env bash
# Proves that a refactor did not change results: runs every algorithm of the suite on two
# versions of the code and compares their per-round output line by line.
#
#   bash bench/compare_commits.sh REF1 REF2 [OUTDIR]
#
# REF1, REF2  git commit-ishes (HEAD, main~3, a sha, a tag, ...) of the repository this script
#             lives in, or "." for its current working tree (tracked files as they are now,
#             plus untracked files that are not ignored). Both trees are copied into a temp
#             dir before anything runs, so later edits of the working tree do not matter.
# OUTDIR      where the extracted lines go (default: a new dir /tmp/compare-commits.XXXXXX):
#             OUTDIR/<ref>/<algorithm>_<mode>.txt, the raw stdout/stderr of every run in
#             OUTDIR/<ref>/raw/, and OUTDIR/refs.txt saying what each ref resolved to.
#             <ref> is the ref with characters other than [A-Za-z0-9._-] made "_" ("." is
#             "worktree"); when both refs give the same name they get suffixes _1 and _2.
#
# Each ref runs seven algorithms (fedavg, fedavgm, fedprox, moon, scaffold, fednova, fedhug) on
# Fashion-MNIST, Dir(0.1), 6 clients, 4 rounds of 5 local iterations, one CPU thread each, in
# three modes:
#   serial   the plain run;
#   workers  the same with --workers 2;
#   resumed  the plain run killed with SIGKILL once its log shows round 1, then continued with
#            --resume (whose stdout replays the whole log).
# Compared are the lines of stdout starting with ">> " or "fedhug client", and each record's
# round and train_loss (full precision) from the run's metrics.jsonl. The script prints one
# line per algorithm and mode (identical / DIFFERENT with a diff), and whether the three modes
# agree within each ref. An entry script <alg>.py missing from a ref whose tree has main.py
# runs as main.py --algorithm <alg>.
#
# Exit status: 0 when everything is identical and every run succeeded, 1 otherwise, 2 on bad
# usage. The Python is $PYTHON, or else the .venv of the repository holding this script.
# Both refs together take about 7 minutes on an idle 2-core machine (14 when another job shares it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
PY="${PYTHON:-$repo/.venv/bin/python}"

ALGORITHMS=(fedavg fedavgm fedprox moon scaffold fednova fedhug)
declare -A ENTRY=(
    [fedavg]="fedavg.py"
    [fedavgm]="fedavg.py --server_momentum 0.9"
    [fedprox]="fedprox.py --mu 0.01"
    [moon]="moon.py --mu 0.1"
    [scaffold]="scaffold.py"
    [fednova]="fednova.py"
    [fedhug]="fedhug.py --start_round 1 --g_steps 5 --synthesis_batch_size 16"
)
MODES=(serial workers resumed)
COMMON=(--dataset fashionmnist --partition noniid --beta 0.1 --n_parties 6 --sample_fraction 0.5
        --num_local_iterations 5 --batch_size 32 --comm_round 4 --init_seed 0
        --threads 1 --device cpu)
KILL_WAIT_S=300          # the most a resumed mode's first run may take to reach round 1
STDERR_TAIL=15           # lines of stderr shown for a failed run
DIFF_LINES=20            # lines of diff shown for a difference

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 2; }

# ------------------------------------------------------------------ set-up and clean-up
work=""
bg_pid=""
cleanup() {
    local rc=$?
    if [[ -n "$bg_pid" ]]; then kill -9 "$bg_pid" 2>/dev/null || true; fi
    if [[ -n "$work" ]]; then rm -rf "$work"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "$*" >&2; }

sanitise() {
    if [[ "$1" == "." ]]; then echo worktree; else echo "${1//[^A-Za-z0-9._-]/_}"; fi
}

# materialise REF DIR: copy the tree of a commit, or of the working tree for ".", into DIR
materialise() {
    local ref="$1" dir="$2"
    mkdir -p "$dir"
    if [[ "$ref" == "." ]]; then
        # tracked files as they are now (deleted ones skipped) plus untracked, non-ignored ones
        (cd "$repo" && git ls-files -co --exclude-standard -z |
            while IFS= read -r -d '' f; do
                if [[ -e "$f" || -L "$f" ]]; then cp -P --parents -- "$f" "$dir/"; fi
            done)
    else
        git -C "$repo" archive "$ref" | tar -x -C "$dir"
    fi
}

# describe REF: one line saying what REF is, for OUTDIR/refs.txt
describe() {
    if [[ "$1" == "." ]]; then
        local changed
        changed="$(git -C "$repo" status --porcelain | wc -l)"
        echo "working tree of $repo on $(git -C "$repo" rev-parse --short HEAD), $changed changed/untracked path(s)"
    else
        git -C "$repo" log -1 --format='%H %s' "$1^{commit}"
    fi
}

# ------------------------------------------------------------------ one run
# entry_command TREE ALG: the entry script and its flags in the tree, into the array ENTRY_CMD
entry_command() {
    local tree="$1" alg="$2"
    local -a words
    read -r -a words <<<"${ENTRY[$alg]}"
    local script="${words[0]}"
    if [[ -f "$tree/$script" ]]; then
        ENTRY_CMD=("${words[@]}")
    elif [[ -f "$tree/main.py" ]]; then
        ENTRY_CMD=(main.py --algorithm "${script%.py}" "${words[@]:1}")
    else
        ENTRY_CMD=()
    fi
}

# report_failure LABEL ALG MODE WHAT STDERR_FILE
report_failure() {
    local label="$1" alg="$2" mode="$3" what="$4" err="$5"
    echo "FAILED: [$label] $alg $mode: $what"
    if [[ -s "$err" ]]; then
        echo "  stderr (last $STDERR_TAIL lines of $err):"
        tail -n "$STDERR_TAIL" "$err" | sed 's/^/  | /'
    fi
}

# extract STDOUT_FILE RUN_DIR OUT_FILE: the compared lines of one mode
extract() {
    local out="$1" run_dir="$2" dest="$3"
    { grep -E '^(>> |fedhug client)' "$out" || true; } >"$dest"
    if [[ -f "$run_dir/metrics.jsonl" ]]; then
        "$PY" - "$run_dir/metrics.jsonl" >>"$dest" <<'EOF'
import json, sys
with open(sys.argv[1]) as f:
    for line in f:
        if line.strip():
            record = json.loads(line)
            print(f"metrics round {record['round']} train_loss {record['train_loss']!r}")
EOF
    fi
}

# run_mode LABEL TREE RESULTS ALG MODE: run one algorithm in one mode; writes
# RESULTS/ALG_MODE.txt, or RESULTS/ALG_MODE.failed when a run failed
run_mode() {
    local label="$1" tree="$2" results="$3" alg="$4" mode="$5"
    local name="${alg}_${mode}" logdir="$work/runs/$label"
    local raw="$results/raw" run_dir="$logdir/${alg}_${mode}"
    local out="$raw/$name.stdout" err="$raw/$name.stderr"
    local rc=0 started=$SECONDS
    mkdir -p "$logdir" "$raw"

    entry_command "$tree" "$alg"
    if [[ ${#ENTRY_CMD[@]} -eq 0 ]]; then
        : >"$err"
        report_failure "$label" "$alg" "$mode" "neither ${ENTRY[$alg]%% *} nor main.py in the tree" "$err"
        touch "$results/$name.failed"; return
    fi
    local -a cmd=("$PY" "${ENTRY_CMD[@]}" "${COMMON[@]}" --logdir "$logdir")
    [[ "$mode" == workers ]] && cmd+=(--workers 2)

    if [[ "$mode" != resumed ]]; then
        (cd "$tree" && exec "${cmd[@]}" --log_file_name "$name" >"$out" 2>"$err") || rc=$?
        if [[ $rc -ne 0 ]]; then
            report_failure "$label" "$alg" "$mode" "exit $rc: ${cmd[*]:1} --log_file_name $name" "$err"
            touch "$results/$name.failed"
        fi
    else
        # 1. the plain run in the background, killed once its log shows round 1
        local first_out="$raw/$name.killed.stdout" first_err="$raw/$name.killed.stderr"
        (cd "$tree" && exec "${cmd[@]}" --log_file_name "$name" >"$first_out" 2>"$first_err") &
        bg_pid=$!
        local deadline=$((SECONDS + KILL_WAIT_S)) reached=0
        while kill -0 "$bg_pid" 2>/dev/null && [[ $SECONDS -lt $deadline ]]; do
            if grep -q '^>> Round 1 ' "$run_dir/log.txt" 2>/dev/null; then reached=1; break; fi
            sleep 0.1
        done
        kill -9 "$bg_pid" 2>/dev/null || true
        wait "$bg_pid" 2>/dev/null || rc=$?   # (2>/dev/null: no "Killed" job notice)
        bg_pid=""
        # a run that finished before the kill is fine (exit 0); the kill itself gives 137
        if grep -q '^>> Round 1 ' "$run_dir/log.txt" 2>/dev/null; then reached=1; fi
        if [[ $reached -eq 0 || ( $rc -ne 0 && $rc -ne 137 ) ]]; then
            local why="exit $rc"
            [[ $reached -eq 0 && ( $rc -eq 0 || $rc -eq 137 ) ]] && why="no '>> Round 1' in $run_dir/log.txt within ${KILL_WAIT_S}s"
            report_failure "$label" "$alg" "$mode (run to be killed)" "$why: ${cmd[*]:1} --log_file_name $name" "$first_err"
            touch "$results/$name.failed"
            return
        fi
        # 2. the resume, whose stdout (the replayed log and the rest) is the mode's output
        rc=0
        (cd "$tree" && exec "${cmd[@]}" --resume "$run_dir" >"$out" 2>"$err") || rc=$?
        if [[ $rc -ne 0 ]]; then
            report_failure "$label" "$alg" "$mode (resume)" "exit $rc: ${cmd[*]:1} --resume $run_dir" "$err"
            touch "$results/$name.failed"
        fi
    fi
    [[ -f "$out" ]] && extract "$out" "$run_dir" "$results/$name.txt"
    if [[ ! -f "$results/$name.failed" && ! -s "$results/$name.txt" ]]; then
        report_failure "$label" "$alg" "$mode" "exit 0 but no round lines in $out" "$err"
        touch "$results/$name.failed"
    fi
    local note=""
    if [[ "$mode" == resumed ]]; then
        note=" ($(grep -o 'resumed from .* after round [0-9]*' "$err" | sed 's/.* after/resumed after/' || true))"
    fi
    log "[$label] $alg $mode: $((SECONDS - started)) s$note"
}

# ------------------------------------------------------------------ comparisons
# same A B: true when both files exist, are non-empty and are equal
same() { [[ -s "$1" && -s "$2" ]] && cmp -s "$1" "$2"; }

show_diff() { diff "$1" "$2" | head -n "$DIFF_LINES" | sed 's/^/    /' || true; }

# ------------------------------------------------------------------ main
main() {
    [[ $# -eq 2 || $# -eq 3 ]] || usage
    [[ "$1" == -h || "$1" == --help ]] && usage
    local -a refs=("$1" "$2") labels dirs
    local outdir="${3:-}"

    [[ -x "$PY" ]] || { echo "error: no Python at $PY (set PYTHON)" >&2; exit 2; }
    local ref
    for ref in "${refs[@]}"; do
        if [[ "$ref" != "." ]] && ! git -C "$repo" rev-parse --quiet --verify "$ref^{commit}" >/dev/null; then
            echo "error: '$ref' is not a commit of $repo" >&2; exit 2
        fi
    done
    labels=("$(sanitise "${refs[0]}")" "$(sanitise "${refs[1]}")")
    if [[ "${labels[0]}" == "${labels[1]}" ]]; then
        labels=("${labels[0]}_1" "${labels[1]}_2")
    fi
    if [[ -z "$outdir" ]]; then outdir="$(mktemp -d /tmp/compare-commits.XXXXXX)"; fi
    mkdir -p "$outdir"
    outdir="$(cd "$outdir" && pwd)"
    work="$(mktemp -d /tmp/compare-commits-work.XXXXXX)"

    local start=$SECONDS i
    : >"$outdir/refs.txt"
    for i in 0 1; do
        dirs[i]="$outdir/${labels[i]}"
        rm -rf "${dirs[i]}"
        mkdir -p "${dirs[i]}"
        materialise "${refs[i]}" "$work/tree/${labels[i]}"
        echo "${labels[i]}: ${refs[i]} = $(describe "${refs[i]}")" >>"$outdir/refs.txt"
    done
    log "comparing ${refs[0]} and ${refs[1]} with $PY; output in $outdir"
    sed 's/^/  /' "$outdir/refs.txt" >&2

    local alg mode
    for i in 0 1; do
        for alg in "${ALGORITHMS[@]}"; do
            for mode in "${MODES[@]}"; do
                run_mode "${labels[i]}" "$work/tree/${labels[i]}" "${dirs[i]}" "$alg" "$mode"
            done
        done
    done

    echo
    echo "== ${refs[0]} (${labels[0]}) vs ${refs[1]} (${labels[1]}); lines in $outdir"
    local ok=1 a b n
    for alg in "${ALGORITHMS[@]}"; do
        for mode in "${MODES[@]}"; do
            a="${dirs[0]}/${alg}_${mode}.txt"
            b="${dirs[1]}/${alg}_${mode}.txt"
            if [[ -f "${a%.txt}.failed" || -f "${b%.txt}.failed" ]]; then
                echo "$alg $mode: FAILED (a run failed, see above)"; ok=0
            elif same "$a" "$b"; then
                echo "$alg $mode: identical ($(wc -l <"$a") lines)"
            else
                echo "$alg $mode: DIFFERENT"; show_diff "$a" "$b"; ok=0
            fi
        done
    done
    echo
    local agree shown failed
    for alg in "${ALGORITHMS[@]}"; do
        for i in 0 1; do
            agree=yes failed=""
            for mode in "${MODES[@]}"; do
                if [[ -f "${dirs[i]}/${alg}_${mode}.failed" ]]; then agree=no failed+=" $mode"; fi
            done
            local serial="${dirs[i]}/${alg}_serial.txt"
            for mode in workers resumed; do
                same "$serial" "${dirs[i]}/${alg}_${mode}.txt" || agree=no
            done
            # the ref as given, or its directory name when both refs are the same
            shown="${refs[i]}"
            [[ "${refs[0]}" == "${refs[1]}" ]] && shown="${labels[i]}"
            echo "$alg $shown serial=workers=resumed: $agree${failed:+ (failed:$failed)}"
            if [[ $agree == no ]]; then
                ok=0
                for mode in workers resumed; do
                    if [[ -s "$serial" && -s "${dirs[i]}/${alg}_${mode}.txt" ]] &&
                        ! same "$serial" "${dirs[i]}/${alg}_${mode}.txt"; then
                        echo "  serial vs $mode:"; show_diff "$serial" "${dirs[i]}/${alg}_${mode}.txt"
                    fi
                done
            fi
        done
    done
    n=$((SECONDS - start))
    echo
    if [[ $ok -eq 1 ]]; then
        echo "ALL IDENTICAL ($((n / 60)) min $((n % 60)) s)"
        return 0
    fi
    echo "NOT IDENTICAL, or a run failed ($((n / 60)) min $((n % 60)) s)"
    return 1
}

main "$@"
