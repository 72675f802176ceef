"""The results documents' table scripts on hand-made run directories: docs/fedf2dg/tables.py
(stage columns, the selected pre-training round, seconds per stage, uploads by kind),
docs/inco_tables.py (mean over groups, per group, paired InCo* - Hetero* differences) and
docs/plot_paper_steps.py (the FedHUG steps plot from its table)."""
import importlib.util
import json
import os

import pytest

from conftest import ROOT


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(run_dir, records, log_lines):
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(run_dir, "log.txt"), "w") as f:
        f.write("\n".join(log_lines + [">> Final Acc: ..."]) + "\n")


def f2dg_records(accuracies, stages=None):
    return [{"round": r, "accuracy": a, "seconds": 1.0 + r, "bytes_uploaded_by_kind": {"weights": 1e6},
             **({"stage": stages[r]} if stages else {})} for r, a in enumerate(accuracies)]


def test_fedf2dg_tables_by_hand(tmp_path, capsys):
    tables = load("docs/fedf2dg/tables.py", "fedf2dg_tables")
    setting = "fashionmnist_noniid_beta0.05"
    stages = ["pretrain", "pretrain", "pretrain", "distil", "rcompete"]
    for seed, (accuracies, selected) in enumerate((([0.1, 0.5, 0.4, 0.6, 0.7], 1), ([0.2, 0.3, 0.5, 0.5, 0.9], 2))):
        write_run(tmp_path / "features" / setting / "runs" / f"fedf2dg_seed{seed}", f2dg_records(accuracies, stages),
                  [f"fedf2dg round 3: stage distil, prior features, student pre-training round {selected}, 80 pseudo"])
        write_run(tmp_path / "baselines" / setting / "runs" / f"fedavg_seed{seed}",
                  f2dg_records([0.3, 0.4, 0.5, 0.6, 0.8 - 0.2 * seed]), [])
    write_run(tmp_path / "baselines" / setting / "runs" / "scaffold_seed0", f2dg_records([0.3] * 5), [])
    os.remove(tmp_path / "baselines" / setting / "runs" / "scaffold_seed0" / "log.txt")   # unfinished: skipped
    open(tmp_path / "baselines" / setting / "runs" / "scaffold_seed0" / "log.txt", "w").write(">> Round 4\n")
    assert tables.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| method | seeds | end of pre-training (round 2) | selected pre-trained model | after distillation " \
           "(round 3) | final (round 4) | best round, selected on the test set |" in out
    # FedAvg: round 2 0.5 both; round 3 0.6 both; final 0.8 and 0.6 -> 70.00 ± 14.14
    assert "| FedAvg | 2 | 50.00 ± 0.00 | - | 60.00 ± 0.00 | 70.00 ± 14.14 | 70.00 ± 14.14 |" in out
    # FedF2DG: round 2 0.4, 0.5; selected rounds 1 (0.5) and 2 (0.5); distil 0.6, 0.5; final 0.7, 0.9
    assert "| FedF2DG, feature prior (SimpleCNN) | 2 | 45.00 ± 7.07 | 50.00 ± 0.00 (rounds 1, 2) | 55.00 ± 7.07 " \
           "| 80.00 ± 14.14 | 80.00 ± 14.14 |" in out
    assert "SCAFFOLD" not in out
    # seconds: rounds 0-2 cost 1 + 2 + 3 = 6, round 3 4, round 4 5; 5 MB of weights over the run
    assert "| FedF2DG, feature prior (SimpleCNN) | 6 ± 0 | 4 ± 0 | 5 ± 0 | 15 ± 0 | weights 5 |" in out


def test_fedf2dg_tables_refuse_an_empty_folder(tmp_path, capsys):
    tables = load("docs/fedf2dg/tables.py", "fedf2dg_tables")
    assert tables.main([str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["hetero", "inco"])
def test_inco_tables_by_hand(tmp_path, capsys, family):
    tables = load("docs/inco_tables.py", "inco_tables")
    setting = tmp_path / "fashionmnist_noniid_beta0.5"
    for seed, (hetero, inco) in enumerate(((0.40, 0.45), (0.50, 0.48))):
        for name, accuracy in (("heteroavg", hetero), ("incoavg", inco)):
            write_run(setting / "runs" / f"{name}_seed{seed}",
                      [{"round": 0, "accuracy": accuracy, "seconds": 2.0, "bytes_uploaded": 3e6,
                        "group_accuracies": {"inco-cnn-1-1": accuracy - 0.1, "inco-cnn-3-3": accuracy + 0.1}}], [])
    assert tables.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    if family == "hetero":
        assert "| HeteroAvg | 2 | 45.00 ± 7.07 | 35.00 ± 7.07 | 55.00 ± 7.07 | 3.0 | 2.0 |" in out
    else:
        # paired differences +5 and -2 points: mean 1.50, std 4.95, ahead on 1 seed of 2
        assert "| Avg | 45.00 ± 7.07 | 46.50 ± 2.12 | 1.50 ± 4.95 | 1 of 2 |" in out


def test_inco_tables_trajectory_by_hand(tmp_path, capsys):
    tables = load("docs/inco_tables.py", "inco_tables")
    setting = tmp_path / "fashionmnist_noniid_beta0.5"
    # (round 4, round 9) accuracies per seed; round 0 trained, not evaluated
    for seed, (hetero, inco) in enumerate((((0.30, 0.40), (0.32, 0.45)), ((0.35, 0.50), (0.33, 0.48)))):
        for name, accuracies in (("heteroavg", hetero), ("incoavg", inco)):
            records = [{"round": 0, "accuracy": None, "seconds": 1.0, "bytes_uploaded": 1e6}]
            records += [{"round": r, "accuracy": a, "seconds": 1.0, "bytes_uploaded": 1e6,
                         "group_accuracies": {"inco-cnn-1-1": a}} for r, a in zip((4, 9), accuracies)]
            write_run(setting / "runs" / f"{name}_seed{seed}", records, [])
    assert tables.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # round 4: +2 and -2 points -> 0.00 ± 2.83; round 9: +5 and -2 -> 1.50 ± 4.95
    assert "| base method | round 4 | round 9 |" in out
    assert "| Avg | 0.00 ± 2.83 | 1.50 ± 4.95 |" in out


def test_paper_steps_plot_reads_the_main_setting_table_only():
    """docs/plot_paper_steps.py takes FedHUG's and FedAvg's rows of the first table (steps, final
    and last-10 mean ± std) and nothing from the shortened run's table below it."""
    plot = load("docs/plot_paper_steps.py", "plot_paper_steps")
    markdown = "\n".join([
        "| variant | synthesis steps | final | last-10 mean | last-10 std | s / round |",
        "| FedHUG | 50 | 77.33 ± 0.04 | 77.45 ± 0.38 | 0.25 ± 0.01 | 50.4 ± 3.7 |",
        "| no entropy term | 50 | 77.57 ± 0.28 | 77.51 ± 0.57 | 0.22 ± 0.06 | 64.0 ± 14.7 *** |",
        "| no synthesis (FedAvg) | 0 | 77.01 ± 1.14 | 76.98 ± 1.15 | 1.36 ± 0.57 | 12.1 ± 2.6 * |",
        "| FedHUG | 500 (the paper's) | 77.15 ± 0.50 | 77.44 ± 0.63 | 0.17 ± 0.10 | 171.6 ± 45.5 |",
        "## A first, shortened run of the ablations",
        "| FedHUG, 25 steps | 25 | 62.11 ± 4.16 | 59.30 ± 5.99 | 2.88 ± 0.93 | 30.2 ± 1.3 |",
        "| FedHUG | 100 | 61.00 ± 5.21 | 58.49 ± 6.10 | 2.53 ± 0.80 | 125.9 ± 41.8 |"])
    assert plot.steps_rows(markdown) == {50: ((77.33, 0.04), (77.45, 0.38)), 0: ((77.01, 1.14), (76.98, 1.15)),
                                         500: ((77.15, 0.50), (77.44, 0.63))}
