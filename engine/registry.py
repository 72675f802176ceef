"""The one list of algorithms: name, where its class lives, its entry script, the flags that
make it (FedAvgM is FedAvg with --server_momentum 0.9), and its display name. run.sh,
sweep.py, tables.py, main.py and the tests read it; an algorithm's own flags (with defaults,
help and the source of each default) are declared on its class (`Algorithm.flags`).

    python main.py --list                          # the table of algorithms and their flags
    python3 engine/registry.py --command NAME      # the script and flags that run NAME, one a line
    python3 engine/registry.py --names             # the names (both without importing torch)
"""
import importlib
import os
import sys
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    name: str             # what run.sh, sweep.py and main.py --algorithm call it
    display: str          # what tables print
    module: str           # the module defining the class
    cls: str              # the class name
    script: str           # the entry script (the seed's command lines call it)
    family: str
    presets: dict = field(default_factory=dict)   # flags that make this variant, with their source
    preset_source: str = ""

    def load(self):
        """The algorithm class (imported on demand)."""
        return getattr(importlib.import_module(self.module), self.cls)

    def command(self):
        """[script, flag, value, ...]: what runs this algorithm with its presets."""
        words = [self.script] + (["--algorithm", self.name] if self.script == "main.py" else [])
        for flag, value in self.presets.items():
            if value is True:                   # an on/off flag: present or absent
                words.append(f"--{flag}")
            elif value is not False:
                words += [f"--{flag}", str(value)]
        return words


# The evaluation protocols of --eval (engine/evaluation.py), named in logs, metrics and tables.
EVAL_PROTOCOLS = {
    "global": "the global model on the global test set",
    "local": "each client's own model on its own test split, total correct / total test samples",
    "groups": "each model group's global model on the global test set, unweighted mean over groups",
}

SEED = "the seed's command line (seeds/fedhug-readme.md)"

ALGORITHMS = {entry.name: entry for entry in [
    Entry("fedavg", "FedAvg", "fedavg", "FedAvg", "fedavg.py", "baselines"),
    Entry("fedavgm", "FedAvgM", "fedavg", "FedAvg", "fedavg.py", "baselines",
          {"server_momentum": 0.9}, SEED),
    Entry("fedprox", "FedProx", "fedprox", "FedProx", "fedprox.py", "baselines"),
    Entry("moon", "MOON", "moon", "MOON", "moon.py", "baselines"),
    Entry("scaffold", "SCAFFOLD", "scaffold", "SCAFFOLD", "scaffold.py", "baselines"),
    Entry("fednova", "FedNova", "fednova", "FedNova", "fednova.py", "baselines"),
    Entry("fedhug", "FedHUG", "fedhug", "FedHUG", "fedhug.py", "fedhug"),
    # personalised FL, PFLlib's way (algorithms/personalised/; run with --eval local or --scenario pfllib)
    Entry("fedavg-ft", "FedAvg+FT", "algorithms.personalised.fedavg_ft", "FedAvgFT", "main.py", "personalised"),
    Entry("fedper", "FedPer", "algorithms.personalised.fedper", "FedPer", "main.py", "personalised"),
    Entry("fedrep", "FedRep", "algorithms.personalised.fedrep", "FedRep", "main.py", "personalised"),
    Entry("lgfedavg", "LG-FedAvg", "algorithms.personalised.lgfedavg", "LGFedAvg", "main.py", "personalised"),
    Entry("ditto", "Ditto", "algorithms.personalised.ditto", "Ditto", "main.py", "personalised"),
    Entry("perfedavg", "Per-FedAvg", "algorithms.personalised.perfedavg", "PerFedAvg", "main.py", "personalised"),
    Entry("fedala", "FedALA", "algorithms.personalised.fedala", "FedALA", "main.py", "personalised"),
    Entry("fedcp", "FedCP", "algorithms.personalised.fedcp", "FedCP", "main.py", "personalised"),
    Entry("gpfl", "GPFL", "algorithms.personalised.gpfl", "GPFL", "main.py", "personalised"),
    Entry("feddbe", "FedDBE", "algorithms.personalised.feddbe", "FedDBE", "main.py", "personalised"),
    # model-heterogeneous FL, HtFLlib's way (algorithms/heterogeneous/; --client_models light4 | hcnns8, --eval local)
    Entry("local", "Local", "algorithms.heterogeneous.local", "Local", "main.py", "heterogeneous"),
    Entry("fedproto", "FedProto", "algorithms.heterogeneous.fedproto", "FedProto", "main.py", "heterogeneous"),
    Entry("fedtgp", "FedTGP", "algorithms.heterogeneous.fedtgp", "FedTGP", "main.py", "heterogeneous"),
    Entry("fedgh", "FedGH", "algorithms.heterogeneous.fedgh", "FedGH", "main.py", "heterogeneous"),
    Entry("feddistill", "FedDistill", "algorithms.heterogeneous.feddistill", "FedDistill", "main.py", "heterogeneous"),
    Entry("fml", "FML", "algorithms.heterogeneous.fml", "FML", "main.py", "heterogeneous"),
    Entry("fedkd", "FedKD", "algorithms.heterogeneous.fedkd", "FedKD", "main.py", "heterogeneous"),
    Entry("fedgen", "FedGen", "algorithms.heterogeneous.fedgen", "FedGen", "main.py", "heterogeneous"),
    Entry("fedgen-pfllib", "FedGen (PFLlib)", "algorithms.heterogeneous.fedgen", "FedGenPFLlib", "main.py",
          "heterogeneous"),
    Entry("fedktl-sub", "FedKTL-sub (substitute G)", "algorithms.heterogeneous.fedktl", "FedKTL", "main.py",
          "heterogeneous"),
    Entry("fedktl-randg", "FedKTL-randG (untrained G)", "algorithms.heterogeneous.fedktl", "FedKTLRandomG", "main.py",
          "heterogeneous"),
    # nested-depth models, InCo's way (algorithms/inco/; the reference protocol: --scenario inco)
    Entry("heteroavg", "HeteroAvg", "algorithms.inco.heteroavg", "HeteroAvg", "main.py", "inco"),
    Entry("incoavg", "InCoAvg", "algorithms.inco.inco", "InCoAvg", "main.py", "inco"),
    Entry("heteroprox", "HeteroProx", "algorithms.inco.heteroavg", "HeteroProx", "main.py", "inco"),
    Entry("incoprox", "InCoProx", "algorithms.inco.inco", "InCoProx", "main.py", "inco"),
    Entry("heteroscaffold", "HeteroScaffold", "algorithms.inco.heteroavg", "HeteroScaffold", "main.py", "inco"),
    Entry("incoscaffold", "InCoScaffold", "algorithms.inco.inco", "InCoScaffold", "main.py", "inco"),
    Entry("heteronova", "HeteroNova", "algorithms.inco.heteroavg", "HeteroNova", "main.py", "inco"),
    Entry("inconova", "InCoNova", "algorithms.inco.inco", "InCoNova", "main.py", "inco"),
    Entry("heteromoon", "HeteroMOON", "algorithms.inco.heteroavg", "HeteroMOON", "main.py", "inco"),
    Entry("incomoon", "InCoMOON", "algorithms.inco.inco", "InCoMOON", "main.py", "inco"),
    # a shared hypernetwork, private embedding and head (hyperfl.py; the reference protocol: --scenario hyperfl)
    Entry("hyperfl", "HyperFL", "hyperfl", "HyperFL", "hyperfl.py", "hyperfl"),
    Entry("fedavg-trained", "FedAvg (after local training)", "hyperfl", "FedAvgTrained", "main.py", "hyperfl"),
    # data-free distillation on the server after pre-training (fedf2dg.py; the reference protocol: --scenario fedf2dg)
    Entry("fedf2dg", "FedF2DG", "fedf2dg", "FedF2DG", "fedf2dg.py", "datafree"),
]}


def get(name):
    """The entry called `name`; a clear error naming the known ones otherwise."""
    from utils import UsageError
    if name not in ALGORITHMS:
        raise UsageError(f"unknown algorithm '{name}'; choose one of {', '.join(ALGORITHMS)} "
                         "(python main.py --list)")
    return ALGORITHMS[name]


def describe():
    """A readable table of every algorithm and its own flags."""
    lines, shown = [], set()
    for entry in ALGORITHMS.values():
        algorithm = entry.load()
        presets = " ".join(f"--{k} {v}" for k, v in entry.presets.items())
        lines.append(f"{entry.name:10} {entry.display:10} {entry.family:10} python {entry.script}"
                     + (f" {presets}   (preset from {entry.preset_source})" if presets else ""))
        if algorithm in shown:
            continue
        shown.add(algorithm)
        bases = [base.__name__ for base in algorithm.__mro__[1:] if vars(base).get("flags")]
        if bases:
            lines.append(f"{'':12}(and the flags of {', '.join(bases)})")
        for flag in vars(algorithm).get("flags", ()):
            source = f"  [from {flag.source}]" if flag.source else ""
            lines.append(f"{'':12}--{flag.name} {flag.default!r}: {flag.help}{source}")
    return "\n".join(lines)


if __name__ == "__main__":      # run as `python3 engine/registry.py ...` by run.sh: no torch needed
    if len(sys.argv) == 3 and sys.argv[1] == "--command":
        if sys.argv[2] not in ALGORITHMS:
            sys.exit(f"error: unknown algorithm '{sys.argv[2]}'; choose one of {', '.join(ALGORITHMS)}")
        print("\n".join(ALGORITHMS[sys.argv[2]].command()))
    elif len(sys.argv) == 2 and sys.argv[1] == "--names":
        print(" ".join(ALGORITHMS))
    else:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        print(describe())
