"""The main job (`bash run.sh`): the table's stability, communication and time columns against
hand values; the whole pipeline at a tiny setting (bench/bench_main_job.py --tiny) writing and
parsing every file; FedHUG warm-started from FedAvg's checkpoint identical to FedHUG computing
those rounds itself; the job's progress bar on the terminal and never in a log; Ctrl-C; --tensorboard."""
import csv
import importlib.util
import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

import pytest

import tables
from conftest import ROOT, run_script
from engine import jobs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the table's columns

def curve(name, accuracies, seconds, uploaded, downloaded):
    records = [{"round": r, "accuracy": a, "seconds": s, "bytes_uploaded": u, "bytes_downloaded": d}
               for r, (a, s, u, d) in enumerate(zip(accuracies, seconds, uploaded, downloaded))]
    records.append({"round": len(accuracies), "accuracy": accuracies[-1], "evaluation_only": True,
                    "seconds": 99.0, "bytes_uploaded": 0, "bytes_downloaded": 10 ** 9})   # left out of the means
    return tables.RunCurve("setting", "fedavg", name, "", list(range(len(accuracies) + 1)),
                           accuracies + [accuracies[-1]], records=records)


def test_stability_bytes_and_seconds_columns_against_hand_values():
    # run 0: 13 accuracies; the last 10 (with the evaluation-only round's repeat of 0.70) are
    # 0.8 0.6 0.7 0.8 0.6 0.7 0.8 0.6 0.7 0.7: mean 0.70, sample std sqrt(6 x 0.01 / 9) = 0.08165
    first = curve("0", [0.5, 0.6, 0.7, 0.9, 0.8, 0.6, 0.7, 0.8, 0.6, 0.7, 0.8, 0.6, 0.7],
                  [1.0, 3.0] * 6 + [2.0], [2e6, 4e6] * 6 + [3e6], [1e6] * 13)
    assert first.last_mean == pytest.approx(0.70)
    assert first.last_std == pytest.approx((0.06 / 9) ** 0.5)
    assert (first.best, first.best_round) == (0.9, 3)
    assert first.mb_up == pytest.approx(3.0) and first.mb_down == pytest.approx(1.0)
    assert first.seconds == pytest.approx(2.0)
    # run 1: constant 0.75 over its last rounds: last-10 mean 0.75, std 0
    second = curve("1", [0.5, 0.6] + [0.75] * 11, [4.0] * 13, [3e6] * 13, [1e6] * 13)
    assert (second.last_mean, second.last_std, second.best_round) == (pytest.approx(0.75), 0.0, 2)
    comparison = tables.Comparison([first, second])
    row = [line for line in tables.to_markdown(comparison).splitlines() if line.startswith("| FedAvg |")][-1]
    # final 70, 75; best 90, 75; best round 3, 2; last-10 mean 70, 75 -> 72.50 ± 3.54;
    # last-10 std 8.165, 0 -> 4.08 ± 5.77; MB up 3, 3; down 1, 1; seconds 2, 4 -> 3.00 ± 1.41
    assert row == ("| FedAvg | 72.50 ± 3.54 | 82.50 ± 10.61 | 2.5 ± 0.7 | 72.50 ± 3.54 | 4.08 ± 5.77 | "
                   "3.000 ± 0.000 | 1.000 ± 0.000 | 3.00 ± 1.41 |")
    rows = {r["metric"]: r for r in csv.DictReader(io.StringIO(tables.to_csv(comparison)))}
    assert float(rows["last10_std"]["mean"]) == pytest.approx(100 * (0.06 / 9) ** 0.5 / 2, abs=1e-4)
    assert float(rows["mb_up_per_round"]["mean"]) == pytest.approx(3.0)
    assert float(rows["seconds_per_round"]["std"]) == pytest.approx(2 ** 0.5, abs=1e-4)


# ----------------------------------------------------------------------------- the pipeline

ROUND_OR_CLIENT_LINE = re.compile(r"^(>> Round \d+ \|.*|fedhug client \d+: .*)$")


def test_main_job_pipeline_writes_every_file_and_warm_fedhug_equals_recomputed(tmp_path):
    logroot = tmp_path / "log"
    bench = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_main_job.py"), "--tiny",
                            "--logroot", str(logroot)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    assert re.search(r"^fedhug_seed0\s+1\s+\d+\.\d\s+\d+\.\d\d$", bench.stdout, re.M), bench.stdout   # 1 own round
    assert re.search(r"^main job: wall-clock \d+ min \d+ s .*a tiny setting", bench.stdout, re.M)
    out = logroot / "fashionmnist_noniid_beta0.5_3clients"
    # every file the job promises, parsed
    table = (out / "table.md").read_text()
    assert "stability, communication and time" in table and "| FedHUG |" in table
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    metrics = {(r["metric"], r["algorithm"]) for r in rows}
    for metric in ("final", "best", "best_round", "last10_mean", "last10_std", "mb_up_per_round",
                   "mb_down_per_round", "seconds_per_round"):
        assert {(metric, "fedavg"), (metric, "fedhug")} <= metrics
    assert r"\begin{tabular}" in (out / "table.tex").read_text()
    for picture in (out / "curves.png", out / "runs" / "fedhug_seed0" / "synthetic.png",
                    out / "runs" / "fedhug_seed0" / "drift_budget.png",
                    out / "runs" / "fedhug_seed0" / "synthesis_diagnostics.png"):
        assert picture.read_bytes()[:8] == PNG_MAGIC, picture
    svg = ElementTree.parse(out / "partition_seed0.svg").getroot()
    counts = [int(t.text) for t in svg.iter("{http://www.w3.org/2000/svg}text") if (t.text or "").isdigit()]
    assert sum(counts) > 60000      # the 3 clients' cells (60,000 training images) plus the axis labels
    # FedHUG continued from FedAvg's checkpoint after round 1 ...
    warm_log = (out / "runs" / "fedhug_seed0" / "log.txt").read_text()
    assert "warm start: fedavg checkpoint after round 1, continuing at round 2" in warm_log
    warm_records = [json.loads(line) for line in open(out / "runs" / "fedhug_seed0" / "metrics.jsonl")]
    assert [("warm_start_from" in r) for r in warm_records] == [True, True, False]
    # ... and equals FedHUG computing rounds 0-1 itself, serially (run.sh used 2 workers)
    full = run_script("fedhug.py", "--dataset", "fashionmnist", "--partition", "noniid", "--beta", "0.5",
                      "--n_parties", "3", "--sample_fraction", "1.0", "--num_local_iterations", "2",
                      "--comm_round", "3", "--start_round", "2", "--g_steps", "2", "--synthesis_batch_size", "16",
                      "--init_seed", "0", logdir=tmp_path, name="full")
    assert full.returncode == 0, full.stderr
    full_lines = [line for line in full.stdout.splitlines() if ROUND_OR_CLIENT_LINE.match(line)]
    warm_lines = [line for line in warm_log.splitlines() if ROUND_OR_CLIENT_LINE.match(line)]
    assert len(full_lines) == 3 + 3 and warm_lines == full_lines
    full_records = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert warm_records[-1]["client_metrics"] == full_records[-1]["client_metrics"]
    assert warm_records[-1]["train_loss"] == full_records[-1]["train_loss"]


# ----------------------------------------------------------------------------- progress and TensorBoard

def read_until_quiet(terminal, quiet_seconds=0.5, limit_seconds=10):
    """All a pseudo-terminal has been given: the kernel hands a pty's output over to the reading
    side asynchronously, so one os.read may return only the first writes."""
    drawn, deadline = b"", time.time() + limit_seconds
    while time.time() < deadline and select.select([terminal], [], [], quiet_seconds)[0]:
        drawn += os.read(terminal, 100_000)
    return drawn.decode()


FAKE_RUN = """
import json, os, sys, time
name, run_dir, rounds, seconds, code = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "starts.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[6:]) + "\\n")
metrics = os.path.join(run_dir, "metrics.jsonl")
done = sum(1 for _ in open(metrics)) if "--resume" in sys.argv and os.path.exists(metrics) else 0
started = time.time()
for r in range(done, rounds):
    time.sleep(seconds / max(rounds, 1))
    print(f"{name} round {r} ünïcode", flush=True)
    with open(metrics, "a") as f:
        f.write(json.dumps({"round": r, "seconds": seconds / max(rounds, 1)}) + "\\n")
    if r < rounds - 1 and os.path.exists(os.path.join(run_dir, PAUSE_FILE)):     # as engine/loop.py
        os.remove(os.path.join(run_dir, PAUSE_FILE))
        print(f"paused after round {r}", flush=True)
        sys.exit(PAUSED_EXIT)
with open(os.path.join(run_dir, "seen.json"), "w") as f:
    json.dump({"argv": sys.argv[6:], "started": started, "ended": time.time()}, f)
sys.exit(code)
""".replace("PAUSE_FILE", repr(jobs.PAUSE_FILE)).replace("PAUSED_EXIT", str(jobs.PAUSED_EXIT))


def add_fake_run(tmp_path, name, rounds, seconds, code=0, **options):
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    run_dir = tmp_path / "runs" / name
    argv = ["add", str(tmp_path / "job.jsonl"), "--name", name, "--log", str(tmp_path / f"{name}.log"),
            "--run_dir", str(run_dir), "--units", str(rounds)]
    for key, value in options.items():
        argv += [f"--{key}"] + ([] if value is True else [str(value)])
    assert jobs.main(argv + ["--", sys.executable, str(script), name, str(run_dir), str(rounds), str(seconds),
                             str(code)]) == 0
    return run_dir


def run_job(tmp_path, cores, err=None, **options):
    runs = [jobs.Run(json.loads(line)) for line in open(tmp_path / "job.jsonl")]
    out = io.StringIO()
    status = jobs.Job(runs, cores, out=out, err=err or io.StringIO(), **options).run()
    return status, out.getvalue()


def seen(run_dir):
    return json.loads((run_dir / "seen.json").read_text())


def test_job_runs_one_per_core_waits_for_after_and_prints_logs_whole_in_start_order(tmp_path):
    slow = add_fake_run(tmp_path, "fedavg_seed0", 3, 1.5)
    other = add_fake_run(tmp_path, "fedprox_seed0", 3, 0.3)
    (tmp_path / "snapshot.pt").write_text("x")
    warm = add_fake_run(tmp_path, "fedhug_seed0", 5, 0.3, after="fedavg_seed0", warm_start=tmp_path / "snapshot.pt",
                        warm_units=2)
    status, out = run_job(tmp_path, cores=2)
    assert status == 0
    # two at a time, one worker each while another run waits; FedHUG only after FedAvg, with the
    # checkpoint it waited for, and both cores (FedProx has finished, nothing else waits)
    assert seen(slow)["argv"] == ["--workers", "1"] and seen(other)["argv"] == ["--workers", "1"]
    assert seen(other)["started"] < seen(slow)["ended"]
    assert seen(warm)["started"] >= seen(slow)["ended"]
    assert seen(warm)["argv"] == ["--load_path", str(tmp_path / "snapshot.pt"), "--workers", "2"]
    # stdout: each log whole under its header, in start order (FedProx finished first, shown second)
    blocks = re.split(r"^run\.sh: === ", out, flags=re.M)[1:]
    assert [block.split(" ", 1)[0] for block in blocks] == ["fedavg_seed0", "fedprox_seed0", "fedhug_seed0"]
    for block, name, rounds in zip(blocks, ("fedavg_seed0", "fedprox_seed0", "fedhug_seed0"), (3, 3, 5)):
        assert block.splitlines()[1:] == [f"{name} round {r} ünïcode" for r in range(rounds)]
        assert block.split("\n", 1)[1] == (tmp_path / f"{name}.log").read_text()
    assert "warm start from" in blocks[2].splitlines()[0]


def test_a_failed_run_is_listed_and_the_others_finish(tmp_path):
    add_fake_run(tmp_path, "broken_seed0", 1, 0.1, code=1)
    done = add_fake_run(tmp_path, "fedavg_seed0", 2, 0.5)
    err = io.StringIO()
    status, _ = run_job(tmp_path, cores=1, err=err)
    assert status == 1 and seen(done)
    assert err.getvalue() == f"run.sh: failed: broken_seed0 (exit 1, see {tmp_path / 'broken_seed0.log'})\n"


def test_a_run_refusing_its_flags_stops_the_job_and_keeps_its_earlier_log(tmp_path):
    """Also when the job was started with SIGINT ignored (in a script's background, `bash run.sh
    &`): the runs get SIGINT back, so the scheduler's SIGINT stops them at once."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stops_the_job_and_keeps_its_earlier_log(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def stops_the_job_and_keeps_its_earlier_log(tmp_path):
    (tmp_path / "refused_seed0.log").write_text("the earlier log\n")
    add_fake_run(tmp_path, "refused_seed0", 0, 0, code=2, resumed=True)
    long_run = add_fake_run(tmp_path, "fedavg_seed0", 50, 60)
    never = add_fake_run(tmp_path, "fedprox_seed0", 1, 0)
    err = io.StringIO()
    started = time.time()
    status, _ = run_job(tmp_path, cores=2, err=err)
    assert status == 2 and time.time() - started < 30            # the 60-second run was stopped
    assert not (long_run / "seen.json").exists() and not never.exists()
    assert (tmp_path / "refused_seed0.log").read_text() == "the earlier log\n"
    assert "holds a run made with other flags" in err.getvalue()


INTERRUPTIBLE_RUN = """
import os, signal, sys, time
name, run_dir = sys.argv[1], sys.argv[2]
os.makedirs(run_dir, exist_ok=True)
interrupts = []

def on_interrupt(signum, frame):
    interrupts.append(time.time())
    if len(interrupts) == 1:
        raise KeyboardInterrupt

signal.signal(signal.SIGINT, on_interrupt)
try:
    for r in range(600):
        print(f"{name} round {r}", flush=True)
        time.sleep(0.1)
except KeyboardInterrupt:
    time.sleep(1.0)          # exiting takes a while: a second SIGINT now would be counted
    with open(os.path.join(run_dir, "interrupts.txt"), "w") as f:
        f.write(str(len(interrupts)))
    sys.exit(130)
"""


def test_ctrl_c_reaches_every_run_once_and_the_job_exits_130(tmp_path):
    """Ctrl-C on a terminal sends SIGINT to the whole foreground process group: the scheduler
    must not send its own on top (a run would be interrupted while saving), must wait for the
    runs to exit, print their logs and exit 130 (run.sh then prints its one message)."""
    script = tmp_path / "interruptible_run.py"
    script.write_text(INTERRUPTIBLE_RUN)
    job_file = tmp_path / "job.jsonl"
    for name in ("fedavg_seed0", "fedprox_seed0"):
        assert jobs.main(["add", str(job_file), "--name", name, "--log", str(tmp_path / f"{name}.log"),
                          "--run_dir", str(tmp_path / "runs" / name), "--units", "600", "--",
                          sys.executable, str(script), name, str(tmp_path / "runs" / name)]) == 0
    scheduler = subprocess.Popen([sys.executable, "-m", "engine.jobs", "run", str(job_file), "--cores", "2"],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True,        # its own process group, as a terminal job
                                 preexec_fn=jobs.default_sigint)   # with SIGINT live (a test runner may ignore it)
    deadline = time.time() + 30
    while time.time() < deadline and not all(
            "round 3" in (tmp_path / f"{name}.log").read_text() if (tmp_path / f"{name}.log").exists() else False
            for name in ("fedavg_seed0", "fedprox_seed0")):
        time.sleep(0.1)
    os.killpg(scheduler.pid, signal.SIGINT)                     # what Ctrl-C does
    try:
        out, err = scheduler.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(scheduler.pid, signal.SIGKILL)
        raise AssertionError("the job did not exit within 30 s of Ctrl-C")
    assert scheduler.returncode == 130, err
    for name in ("fedavg_seed0", "fedprox_seed0"):
        assert (tmp_path / "runs" / name / "interrupts.txt").read_text() == "1"     # one SIGINT each
        assert f"{name} round 3" in out                          # both logs reached stdout
    assert "Traceback" not in err


def test_a_core_left_free_widens_the_running_run_which_continues_from_its_checkpoint(tmp_path):
    """FedHUG waits for FedAvg, so one core would idle while FedAvg runs: FedAvg is asked to
    pause after a round (engine.loop: the pause file) and continues from its checkpoint with
    both cores; its log shows every round once, in order, and where it continued."""
    fedavg = add_fake_run(tmp_path, "fedavg_seed0", 12, 2.4)
    fedhug = add_fake_run(tmp_path, "fedhug_seed0", 3, 0.6, after="fedavg_seed0")
    status, out = run_job(tmp_path, cores=2, min_widen_seconds=0.5)
    assert status == 0

    starts = [json.loads(line) for line in open(fedavg / "starts.jsonl")]
    assert starts == [["--workers", "1"], ["--resume", str(fedavg), "--no_replay", "--workers", "2"]]
    assert [json.loads(line)["round"] for line in open(fedavg / "metrics.jsonl")] == list(range(12))
    assert [json.loads(line) for line in open(fedhug / "starts.jsonl")] == [["--workers", "2"]]
    assert not (fedavg / jobs.PAUSE_FILE).exists()
    block = out.split("run.sh: === fedhug_seed0")[0]
    assert re.findall(r"^fedavg_seed0 round (\d+) ", block, flags=re.M) == [str(r) for r in range(12)]
    paused_at = int(re.search(r"paused after round (\d+)", block).group(1))
    assert block.splitlines().index("run.sh: === fedavg_seed0 continues from its checkpoint with 2 workers ===") \
        == block.splitlines().index(f"paused after round {paused_at}") + 1


def test_a_run_with_little_left_is_not_widened(tmp_path):
    """A restart costs seconds: below --min_widen_seconds left the run keeps its one core."""
    fedavg = add_fake_run(tmp_path, "fedavg_seed0", 4, 0.8)
    add_fake_run(tmp_path, "fedhug_seed0", 3, 0.6, after="fedavg_seed0")
    assert run_job(tmp_path, cores=2, min_widen_seconds=5)[0] == 0
    assert [json.loads(line) for line in open(fedavg / "starts.jsonl")] == [["--workers", "1"]]


def test_job_bar_time_left_weighs_each_run_by_its_own_seconds_a_round(tmp_path):
    """Finished A (2 rounds of 1 s), running B (1 of 4 rounds at 3 s: 9 s left), C not started
    (10 rounds at the mean round so far, 5/3 s: 16.7 s): on 1 core 25.7 s; on 2 cores the
    longest run's 16.7 s, more than half the sum (12.8 s)."""
    runs = []
    for name, units, seconds, status in (("a", 2, [1, 1], 0), ("b", 4, [3], None), ("c", 10, [], None)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "seconds": s}) + "\n"
                                                       for r, s in enumerate(seconds)))
        run = jobs.Run({"name": name, "log": str(tmp_path / f"{name}.log"), "run_dir": str(run_dir),
                        "units": units, "argv": []})
        run.status = status
        runs.append(run)
    assert jobs.Bar(runs, io.StringIO(), cores=1).seconds_left() == pytest.approx(9 + 50 / 3)
    assert jobs.Bar(runs, io.StringIO(), cores=2).seconds_left() == pytest.approx(50 / 3)
    assert jobs.Bar(runs[2:], io.StringIO()).seconds_left() is None


def test_job_bar_is_drawn_on_a_terminal_and_not_into_a_file(tmp_path):
    add_fake_run(tmp_path, "fedavg_seed0", 4, 1.0)
    terminal, screen = os.openpty()
    with os.fdopen(os.dup(screen), "w") as stream:
        status, out = run_job(tmp_path, cores=1, err=stream)
    drawn = read_until_quiet(terminal)
    assert status == 0 and "run.sh [0/1 runs]" in drawn and re.search(r"\d/4 rounds", drawn), drawn
    assert "running fedavg_seed0" in drawn and "run.sh [" not in out
    os.close(terminal), os.close(screen)
    with open(tmp_path / "bar.txt", "w") as file:
        jobs.Bar([], file).draw()
    assert (tmp_path / "bar.txt").read_text() == ""


def test_tensorboard_scalars_or_one_clear_line(tmp_path):
    result = run_script("fedavg.py", "--n_parties", "2", "--num_local_iterations", "1", "--comm_round", "2",
                        "--tensorboard", logdir=tmp_path, name="tb")
    if importlib.util.find_spec("tensorboard") is None:
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1] == ("error: --tensorboard needs the tensorboard package: "
                                                          "pip install tensorboard (or leave the flag out)")
        assert not (tmp_path / "tb").exists()
    else:
        assert result.returncode == 0, result.stderr
        assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb" / "tensorboard"))
