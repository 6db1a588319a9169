"""``ncrobust``, the console script: ``measure`` on a plain module and on a RobustBench-layout
WideResNet-28-10 state dict built here (no download), its values against the library's direct
computation, and every bad input as one line that leaves an existing table alone."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
import yaml
import test_data
from test_data import write_cifar
from test_robustbench import WideResNet, randomized
from workflow_helpers import REPO_ROOT, SMALLNET, cell_dir, tiny_config

from ncrobust import data as datasets
from ncrobust.cell import Cell
from ncrobust.collapse import nc_metrics
from ncrobust.columns import METRIC_COLUMNS
from ncrobust.measure import STANDARD_THREATS, measure, subset
from ncrobust.models.adapter import TappedModule
from ncrobust.tables import metrics_frame

pytestmark = pytest.mark.workflow

NCROBUST = str(Path(sys.executable).with_name("ncrobust"))



def ncrobust(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([NCROBUST, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"ncrobust {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints (torch's warnings aside)."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ncrobust")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding a user's own module (smallnet.py) and its trained-for-nothing weights."""
    root = tmp_path_factory.mktemp("cli")
    (root / "smallnet.py").write_text(textwrap.dedent(SMALLNET))
    sys.path.insert(0, str(root))
    try:
        import smallnet
    finally:
        sys.path.remove(str(root))
    torch.manual_seed(0)
    net = smallnet.SmallNet()
    torch.save(net.state_dict(), root / "small.pt")
    torch.save(net, root / "whole.pt")  # a pickled module: loads only with --trust
    torch.save(smallnet.SmallNet(num_classes=7).state_dict(), root / "small7.pt")  # 7 logits for digits' 10 classes
    return root, net


def test_help_reads_well(workdir):
    root, _ = workdir
    top = ncrobust("--help", cwd=root).stdout
    for command in ("measure", "check-config", "config-reference", "collect", "findings"):
        assert command in top
    help_text = ncrobust("measure", "--help", cwd=root).stdout
    assert "--arch" in help_text and "robustbench" in help_text and "examples:" in help_text
    module = subprocess.run([sys.executable, "-m", "ncrobust", "--help"], capture_output=True, text=True, cwd=root)
    assert module.returncode == 0 and "measure" in module.stdout
    assert "valid" in ncrobust("check-config", str(Path(__file__).parents[1] / "config" / "config.yaml"), cwd=root).stdout


def test_measure_a_plain_module_equals_the_library(workdir):
    root, net = workdir
    out = root / "small.parquet"
    proc = ncrobust("measure", "small.pt", "--arch", "smallnet:SmallNet", "--dataset", "digits", "--taps", "body.2",
                    "--max-samples", "200", "--out", str(out), "--threads", "1", cwd=root)
    table = pd.read_parquet(out)
    assert list(table.columns) == METRIC_COLUMNS and set(table["layer"]) == {"body.2", "penultimate"}
    assert set(table["perturbation"]) == {"clean", "pgd", "pgd-targeted", "gaussian"}
    assert (table["model"] == "small").all() and (table["split"] == "test").all()
    # the same measurement in this process: identical rows
    digits = subset(datasets.load("digits", seed=0), 200)
    results = measure(TappedModule(net, taps=["body.2"]).eval(), digits, threat=STANDARD_THREATS["linf"],
                      perturbations={"clean": {}, "pgd": {}, "pgd-targeted": {}, "gaussian": {}})
    pd.testing.assert_frame_equal(table, metrics_frame(results, Cell("digits", "small", "ce", "st", 0), 0), check_exact=True)
    summary = proc.stdout.splitlines()
    assert summary[0].split()[:3] == ["split", "perturbation", "acc"] and summary[-1].startswith(f"wrote {out}")


@pytest.mark.slow
def test_measure_a_robustbench_wide_resnet(tmp_path):
    """A RobustBench-layout WideResNet-28-10 state dict (random weights and BatchNorm statistics,
    ``module.`` prefixes as DataParallel saves them) on a staged CIFAR-10: the table's penultimate
    NC metrics equal ``nc_metrics`` of the RobustBench network's own features of the same images."""
    test_data.RNG = np.random.default_rng(0)  # 16 test images holding every class (NC needs each)
    write_cifar(tmp_path / "data", n_test=16)
    reference = randomized(WideResNet(depth=28, widen_factor=10), seed=0).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "rb.pt")
    out = tmp_path / "rb.parquet"
    ncrobust("measure", "rb.pt", "--arch", "wrn28_10", "--format", "robustbench", "--dataset", "cifar10",
             "--data-root", "data", "--dataset-option", "verify_checksums=false", "--perturbations", "clean",
             "--penultimate-only", "--out", str(out), cwd=tmp_path)
    table = pd.read_parquet(out).set_index("metric")
    cifar = datasets.load("cifar10", root=tmp_path / "data", verify_checksums=False)
    x, y = datasets.as_float(cifar, "test")
    features = {}
    reference.fc.register_forward_pre_hook(lambda _m, inputs: features.update(h=inputs[0]))
    with torch.no_grad():
        logits = reference(x)
    direct = nc_metrics(features["h"], y, num_classes=10, weight=reference.fc.weight, logits=logits)
    scalars = table[table["class"].isna() & table["row"].isna()]["value"]
    for metric in ("nc1", "nc2_equinorm_M", "nc2_equiangle_M", "nc3", "accuracy"):
        # the registry's adaptive pool sums in another order than RobustBench's avg_pool2d(8): float32 ulps
        assert scalars[metric] == pytest.approx(direct[metric], rel=1e-4), metric


def test_a_whole_pickled_module_needs_trust(workdir, tmp_path):
    root, _ = workdir
    refused = error_line(ncrobust("measure", "whole.pt", "--dataset", "digits", cwd=root, check=False))
    assert "refused" in refused and "--trust" in refused
    out = tmp_path / "whole.parquet"
    ncrobust("measure", "whole.pt", "--trust", "--format", "module", "--dataset", "digits", "--max-samples", "100",
             "--perturbations", "clean", "--out", str(out), cwd=root)
    assert len(pd.read_parquet(out))


def test_a_malicious_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "make_evil.py").write_text(textwrap.dedent(f'''
        import torch
        class Payload:
            def __reduce__(self):
                return (exec, ("open({str(marker)!r}, 'w').write('pwned')",))
        torch.save({{"state_dict": {{"w": torch.zeros(1)}}, "hook": Payload()}}, "evil.pt")
    '''))
    subprocess.run([sys.executable, "make_evil.py"], cwd=tmp_path, check=True)
    line = error_line(ncrobust("measure", "evil.pt", "--arch", "mlp", "--dataset", "digits", cwd=tmp_path, check=False))
    assert "refused" in line and not marker.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["absent.pt", "--arch", "mlp"], "no such file"),
        (["small.pt", "--arch", "mlp", "--format", "nonsense"], "unknown format 'nonsense'"),
        (["small.pt", "--arch", "mlp"], "do not fit mlp: missing"),
        (["small7.pt", "--arch", "smallnet:SmallNet", "--option", "num_classes=7"], r"not \[N, 10\] logits"),
        (["small.pt", "--arch", "smallnet:SmallNet", "--taps", "body.7"], "no such module"),
        (["small.pt", "--arch", "smallnet:SmallNet", "--perturbations", "clean,fgsm"], "unknown perturbations"),
        (["small.pt", "--arch", "smallnet:SmallNet", "--mean", "0.5"], "both mean and std"),
    ],
)
def test_bad_input_is_one_line_and_keeps_the_table(workdir, args, message):
    root, _ = workdir
    out = root / "kept.parquet"
    out.write_bytes(b"an earlier table")
    line = error_line(ncrobust("measure", *args, "--dataset", "digits", "--out", str(out), cwd=root, check=False))
    assert re.search(message, line), line
    assert out.read_bytes() == b"an earlier table"


def test_the_worked_examples_run(tmp_path, finished_tiny_run):
    """docs/own-network.md's three commands, as written, on files of the names they use: the tiny
    run's PGD checkpoint and config under the default run's names, a RobustBench-layout WRN-28-10
    with random weights, a torchvision ResNet-18 state dict, and a synthetic CIFAR-10 of 16 test
    images. Added to each command on CIFAR-10: the synthetic files' checksum check off, and for the
    WRN-28-10 (on a CPU) one PGD step instead of ten."""
    page = (REPO_ROOT / "docs/own-network.md").read_text()
    commands = [line[2:] for block in re.findall(r"```console\n(.*?)```", page, flags=re.S)
                for line in block.splitlines() if line.startswith("$ ")]
    assert len(commands) == 3
    own = tmp_path / "results/runs/digits/mlp/ce/pgd-linf/base/seed1/checkpoints/epoch60.pt"
    own.parent.mkdir(parents=True)
    own.write_bytes((finished_tiny_run / cell_dir(adversary="pgd-linf") / "checkpoints/epoch4.pt").read_bytes())
    (tmp_path / "config").mkdir()
    (tmp_path / "config/config.yaml").write_text(yaml.safe_dump(tiny_config()))
    test_data.RNG = np.random.default_rng(0)
    write_cifar(tmp_path / "data", n_test=16)
    robustbench = tmp_path / "models/cifar10/Linf/Carmon2019Unlabeled.pt"
    robustbench.parent.mkdir(parents=True)
    torch.save(randomized(WideResNet(depth=28, widen_factor=10), seed=0).state_dict(), robustbench)
    torch.save(torchvision.models.get_model("resnet18", weights=None, num_classes=10).state_dict(),
               tmp_path / "resnet18_cifar10.pt")
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "ncrobust"
        if "cifar10" in args:
            args += ["--dataset-option", "verify_checksums=false"]
        if "wrn28_10" in args:
            args += ["--steps", "1"]
        proc = ncrobust(*args[1:], cwd=tmp_path)
        out = tmp_path / args[args.index("--out") + 1]
        table = pd.read_parquet(out)
        assert list(table.columns) == METRIC_COLUMNS and "pgd" in set(table["perturbation"])
        assert proc.stdout.splitlines()[0].split()[:3] == ["split", "perturbation", "acc"]
    layers = set(pd.read_parquet(tmp_path / "resnet18.parquet")["layer"])
    assert layers == {"layer3", "layer4", "penultimate"}
    mlp = pd.read_parquet(tmp_path / "pgd_mlp.parquet")
    assert set(mlp["adversary"]) == {"pgd-linf"} and set(mlp["epoch"]) == {4}
