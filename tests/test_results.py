"""The comparison: tables.py, plot_curves.py and run.sh.

The fixture logs (tests/fixtures/logs) hold two settings:
  fashionmnist_noniid_beta0.1/  logs as this suite's scripts write them, several seeds;
  published_beta0.5/            logs in the published code's format: other text around the
                                `>> Round` lines, a resumed run that replays rounds 0-1, a
                                tqdm line glued to a round line by '\\r', a log with no rounds.
"""
import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

import plot_curves
import tables
from conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "logs")
SETTING_A, SETTING_B = "fashionmnist_noniid_beta0.1", "published_beta0.5"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*command, env=None, timeout=120):
    """A command in the repository root; returns the CompletedProcess."""
    return subprocess.run(list(command), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def python(script, *args):
    return run(sys.executable, os.path.join(ROOT, script), *map(str, args))


def by_hand(values):
    """Mean and sample std (ddof=1) of accuracies in percent, written out."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


# Final and best accuracy (%) of every fixture run, read off the logs by eye:
#   setting A: fedavg seeds 0,1,2 end at 65, 69, 70 (best 70, 69, 72); fedhug seeds 0,1 end at
#              75.5, 74.5 (best 75.5, 76.5); moon seed 0 ends at 58.766 (best 60.123).
#   setting B: fedavg seeds 0,1 end at 84, 86 (best 85.26, 86); fedavgm ends at 85.123 (best 86.789).
# 68 ± sqrt((9+1+4)/2) = 2.6458;  70.333 ± sqrt((1/9+16/9+25/9)/2) = 1.5275;  two runs: |a-b|/sqrt(2).
FINAL_ROWS = ["| FedAvg | 68.00 ± 2.65 | 85.00 ± 1.41 |",
              "| FedAvgM | – | 85.12 |",
              "| MOON | 58.77 | – |",
              "| FedHUG | 75.00 ± 0.71 | – |"]
BEST_ROWS = ["| FedAvg | 70.33 ± 1.53 | 85.63 ± 0.52 |",
             "| FedAvgM | – | 86.79 |",
             "| MOON | 60.12 | – |",
             "| FedHUG | 76.00 ± 0.71 | – |"]


def test_hand_values_agree_with_the_strings():
    """The expected strings above follow from the per-run numbers by the stated formula."""
    assert "%.2f ± %.2f" % by_hand([65, 69, 70]) == "68.00 ± 2.65"
    assert "%.2f ± %.2f" % by_hand([70, 69, 72]) == "70.33 ± 1.53"
    assert "%.2f ± %.2f" % by_hand([85.26, 86]) == "85.63 ± 0.52"
    assert "%.2f ± %.2f" % by_hand([84, 86]) == "85.00 ± 1.41"


# ----------------------------------------------------------------------------- reading logs

def test_published_format_log_is_read_from_its_round_lines_only():
    run_ = tables.read_log(os.path.join(FIXTURES, SETTING_B, "fedavg_seed0.log"), SETTING_B)
    assert (run_.algorithm, run_.seed) == ("fedavg", "0")
    assert run_.rounds == [0, 1, 2, 3]
    assert run_.accuracies == [0.81, 0.83, 0.8526, 0.84]     # 'Current Acc: 0.99999' line ignored
    assert (run_.final, run_.best) == (0.84, 0.8526)


def test_replayed_rounds_and_carriage_returns():
    """A resumed run repeats rounds 0-1; a tqdm '\\r' glues round 2 to a progress bar."""
    run_ = tables.read_log(os.path.join(FIXTURES, SETTING_B, "fedavg_seed1.log"), SETTING_B)
    assert run_.rounds == [0, 1, 2, 3]
    assert run_.accuracies == [0.80, 0.845, 0.83, 0.86]


def test_log_without_seed_suffix_and_log_without_rounds():
    run_ = tables.read_log(os.path.join(FIXTURES, SETTING_B, "fedavgm.log"), SETTING_B)
    assert (run_.algorithm, run_.seed, run_.final, run_.best) == ("fedavgm", "", 0.85123, 0.86789)
    assert tables.read_log(os.path.join(FIXTURES, SETTING_B, "fedprox_seed0.log"), SETTING_B) is None


# ----------------------------------------------------------------------------- the table

def test_markdown_table_of_two_settings_and_several_seeds(tmp_path):
    output = tmp_path / "table.md"
    result = python("tables.py", FIXTURES, "--output", output)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    final_at = lines.index("### Final-round test accuracy (%)")
    best_at = lines.index("### Best-round test accuracy (%): best round (selected on the test set)")
    assert final_at < best_at
    header = f"| algorithm | {SETTING_A} | {SETTING_B} |"
    assert lines[final_at + 2] == header and lines[best_at + 2] == header
    assert lines[final_at + 4:final_at + 8] == FINAL_ROWS     # rows in the suite's order
    assert lines[best_at + 4:best_at + 8] == BEST_ROWS
    assert "ddof=1" in result.stdout and "1-3 run(s)" in result.stdout
    assert output.read_text() == result.stdout
    # the log without rounds is named in one warning; the run is not counted
    assert "fedprox_seed0.log has no '>> Round' lines" in result.stderr
    assert "FedProx" not in result.stdout


def test_csv_output_parses_to_the_right_numbers():
    result = python("tables.py", FIXTURES, "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = {(r["metric"], r["setting"], r["algorithm"]): r for r in csv.DictReader(io.StringIO(result.stdout))}
    assert len([r for r in rows if r[0] in ("final", "best")]) == 10    # 5 (setting, algorithm) cells x final/best
    # the stability columns of every cell (the fixture logs have no run directories: no bytes, no seconds)
    assert {r[0] for r in rows} == {"final", "best", "best_round", "last10_mean", "last10_std"}
    fedavg = rows[("final", SETTING_A, "fedavg")]
    assert int(fedavg["runs"]) == 3 and fedavg["rounds"] == "3"
    assert float(fedavg["mean"]) == pytest.approx(68.0, abs=1e-4)
    assert float(fedavg["std"]) == pytest.approx(math.sqrt(7), abs=1e-4)
    best = rows[("best", SETTING_B, "fedavg")]
    assert float(best["mean"]) == pytest.approx(85.63, abs=1e-4)
    assert float(best["std"]) == pytest.approx(0.74 / math.sqrt(2), abs=1e-4)
    assert {r["evaluation"] for r in rows.values()} == {"global"}     # the protocol of every cell
    single = rows[("best", SETTING_B, "fedavgm")]
    assert single["runs"] == "1" and single["std"] == ""
    assert float(single["mean"]) == pytest.approx(86.789, abs=1e-4)


def test_latex_output_holds_the_cells():
    result = python("tables.py", FIXTURES, "--format", "latex")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.count(r"\begin{tabular}{lcc}") == 2 and text.count(r"\end{table}") == 4   # + one per setting
    assert r"fashionmnist\_noniid\_beta0.1 & published\_beta0.5 \\" in text
    assert r"FedAvg & $68.00 \pm 2.65$ & $85.00 \pm 1.41$ \\" in text
    assert r"FedAvg & $70.33 \pm 1.53$ & $85.63 \pm 0.52$ \\" in text
    assert r"MOON & $58.77$ & -- \\" in text
    assert "best round (selected on the test set)" in text


def test_group_by_folder_or_path(tmp_path):
    """Two folders of the same name merge under --group_by folder and stay apart under path."""
    for parent, accuracy in (("a", 0.5), ("b", 0.7)):
        folder = tmp_path / parent / "same_setting"
        folder.mkdir(parents=True)
        (folder / f"fedavg_seed{parent == 'b':d}.log").write_text(
            f">> Round 0 | Current Acc: {accuracy:.5f}, Best Acc: {accuracy:.5f}\n")
    merged = python("tables.py", tmp_path, "--format", "csv")
    assert merged.returncode == 0, merged.stderr
    assert ",same_setting,fedavg,global,2,60.0000,14.1421,1" in merged.stdout
    apart = python("tables.py", tmp_path / "a", tmp_path / "b", "--format", "csv", "--group_by", "path")
    final_and_best = [line for line in apart.stdout.splitlines() if line.startswith(("final,", "best,"))]
    assert sum(",fedavg,global,1," in line for line in final_and_best) == 4   # 2 settings x final/best, one run each


def test_runs_of_different_lengths_are_flagged(tmp_path):
    """A quick-profile log beside a longer one: the final-round cells are not comparable."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "fedavg_seed0.log").write_text(">> Round 0 | Current Acc: 0.50000, Best Acc: 0.50000\n")
    (folder / "moon_seed0.log").write_text("".join(
        f">> Round {r} | Current Acc: 0.60000, Best Acc: 0.60000\n" for r in range(3)))
    result = python("tables.py", folder)
    assert result.returncode == 0
    assert "warning: setting mixed: runs of different lengths (1, 3 rounds)" in result.stderr
    assert "(1-3 rounds)" in result.stdout
    fixture = python("tables.py", os.path.join(FIXTURES, SETTING_A))
    assert fixture.stderr == ""


def test_run_directory_is_read_from_metrics_jsonl(tmp_path):
    run_dir = tmp_path / "my_setting" / "runs" / "scaffold_seed4"
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r, acc in enumerate([0.3, 0.61234, 0.55]):
            f.write(json.dumps({"round": r, "accuracy": acc, "best_accuracy": acc}) + "\n")
    runs = tables.collect_runs([str(run_dir)])
    assert [(r.setting, r.algorithm, r.seed, r.final, r.best) for r in runs] == \
        [("my_setting", "scaffold", "4", 0.55, 0.61234)]
    # a folder walk reads *.log files only: the run directory is not counted a second time
    (tmp_path / "my_setting" / "scaffold_seed4.log").write_text(">> Round 0 | Current Acc: 0.30000, Best Acc: 0.30000\n")
    assert len(tables.collect_runs([str(tmp_path)])) == 1


def test_runs_under_another_evaluation_protocol_get_their_own_column(tmp_path):
    """--eval local numbers are not comparable with global ones: "<setting> [local]", named in the CSV."""
    for name, protocol in (("fedavg_seed0", "global"), ("fedavg_seed1", "local")):
        run_dir = tmp_path / "setting" / "runs" / name
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps(
            {"round": 0, "evaluation": protocol, "accuracy": 0.5, "best_accuracy": 0.5}) + "\n")
    runs = tables.collect_runs([str(tmp_path / "setting" / "runs" / n) for n in ("fedavg_seed0", "fedavg_seed1")])
    assert sorted((r.setting, r.evaluation) for r in runs) == [("setting", "global"), ("setting [local]", "local")]


@pytest.mark.parametrize("script", ["tables.py", "plot_curves.py"])
def test_no_logs_is_one_line_error(tmp_path, script):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_rounds = tmp_path / "no_rounds"
    no_rounds.mkdir()
    shutil.copy(os.path.join(FIXTURES, SETTING_B, "fedprox_seed0.log"), no_rounds)
    for path in (empty, tmp_path / "missing", no_rounds):
        result = python(script, path, *(["-o", tmp_path / "x.png"] if script == "plot_curves.py" else []))
        assert result.returncode == 2
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(path) in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- the curves

def test_curve_is_mean_with_min_max_band():
    comparison = tables.Comparison(tables.collect_runs([os.path.join(FIXTURES, SETTING_A)]))
    rounds, mean, low, high = plot_curves.mean_and_band(comparison.cells[(SETTING_A, "fedavg")])
    assert list(rounds) == [0, 1, 2]
    assert mean[1] == pytest.approx((70 + 61 + 72) / 3)
    assert (low[1], high[1]) == pytest.approx((61, 72))


def test_plot_writes_a_png(tmp_path):
    picture = tmp_path / "curves.png"
    result = python("plot_curves.py", FIXTURES, "-o", picture)
    assert result.returncode == 0, result.stderr
    data = picture.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


# ----------------------------------------------------------------------------- run.sh

def test_run_sh_help_and_bad_flags():
    help_ = run("bash", "run.sh", "--help")
    assert help_.returncode == 0 and help_.stdout.startswith("usage: bash run.sh")
    for args, env, message in (
            (["--bogus", "1"], None, "unknown option '--bogus'"),
            (["--beta"], None, "--beta needs a value"),
            (["--profile", "fast"], None, "unknown profile 'fast'"),
            ([], {"ALGORITHMS": "fedavg fedfoo"}, "unknown algorithm 'fedfoo'"),
            (["--seeds", "0 one"], None, "seeds must be whole numbers"),
            (["--rounds=ten"], None, "ROUNDS must be a whole number")):
        result = run("bash", "run.sh", *args, env=env)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.splitlines() == [result.stderr.strip()] and message in result.stderr
        assert result.stdout == ""      # stopped before the set-up and any run


def test_run_sh_tiny_comparison(tmp_path):
    """One round of two local iterations of FedAvg and FedAvgM, then the table and curves;
    then the same folder again: continued with more rounds, refused with other flags."""
    result = run("bash", "run.sh", "--algorithms", "fedavg fedavgm", timeout=300,
                 env={"ROUNDS": "1", "ITERS": "2", "LOGROOT": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = tmp_path / "fashionmnist_noniid_beta0.1"
    for algorithm in ("fedavg", "fedavgm"):
        assert ">> Round 0 | Current Acc: " in (out / f"{algorithm}_seed0.log").read_text()
        assert (out / "runs" / f"{algorithm}_seed0" / "metrics.jsonl").is_file()
    table = (out / "table.md").read_text()
    assert "| FedAvg | " in table and "| FedAvgM | " in table and table in result.stdout
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert "run.sh: elapsed" in result.stdout

    # Again with one more round: FedAvg continues from its checkpoint, its log keeps round 0.
    more = run("bash", "run.sh", "--algorithms", "fedavg", timeout=300,
               env={"ROUNDS": "2", "ITERS": "2", "LOGROOT": str(tmp_path)})
    assert more.returncode == 0, more.stdout[-2000:] + more.stderr[-2000:]
    continued = tables.read_log(str(out / "fedavg_seed0.log"), "s")
    assert continued.rounds == [0, 1] and "resumed from" in more.stdout
    # Other local iterations than the run on disk: stop, name the run, keep its log.
    before = (out / "fedavg_seed0.log").read_text()
    other = run("bash", "run.sh", "--algorithms", "fedavg", "--iters", "3", timeout=300,
                env={"ROUNDS": "2", "LOGROOT": str(tmp_path)})
    assert other.returncode == 2
    assert "runs/fedavg_seed0 holds a run made with other flags" in other.stderr
    assert (out / "fedavg_seed0.log").read_text() == before


def test_run_sh_pfl_profile_runs_the_personalised_comparison(tmp_path):
    """--profile pfl: PFLlib's scenario (here with SimpleCNN and small training splits to stay
    short), rounds 0..R evaluated on local tests, the table in its own setting folder."""
    result = run("bash", "run.sh", "--profile", "pfl", "--model", "simplecnn-mnist", "--algorithms", "fedper",
                 "--rounds", "1", "--", "--train_ratio", "0.05", timeout=300, env={"LOGROOT": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "profile pfl (--scenario pfllib)" in result.stdout
    out = tmp_path / "pfl_fashionmnist_pfllib_20clients_simplecnn-mnist"
    log = (out / "fedper_seed0.log").read_text()
    assert "evaluation: local" in log and ">> Round 1 | Current Acc: " in log and "(evaluation only)" in log
    assert "| FedPer | " in (out / "table.md").read_text()
