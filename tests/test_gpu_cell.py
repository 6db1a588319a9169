"""benchmarks/gpu_cell.py: its smoke mode runs the real pipeline functions, and its projection
is the paper grid's arithmetic."""

import sys

import pytest
import yaml
from workflow_helpers import REPO_ROOT, stage_placeholders

from ncrobust.config import validate_config

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # importable by name: --packed's spawned processes import it too
import gpu_cell  # noqa: E402


@pytest.mark.slow
def test_smoke_mode_trains_evaluates_and_attacks_a_cell(tmp_path):
    result = gpu_cell.main(["--smoke", "--device", "cpu", "--models", "preact_resnet18", "--adversaries", "pgd-linf",
                            "--workdir", str(tmp_path)])
    assert result["epoch_seconds"][("preact_resnet18", "pgd-linf")] > 0
    assert result["evaluation_seconds"]["preact_resnet18"] > 0 and result["strong_seconds"]["preact_resnet18"] > 0
    phases = result["evaluation_phase_seconds"]["preact_resnet18"]
    assert 0 < phases["attacks"] and 0 < phases["measure"]
    assert phases["attacks"] + phases["measure"] < result["evaluation_seconds"]["preact_resnet18"]
    from ncrobust.evaluation import checkpoint as evaluation
    assert evaluation.perturb.__name__ == "perturb" and evaluation._measure.__name__ == "_measure"  # restored
    assert (tmp_path / "preact_resnet18" / "pgd-linf" / "metrics.parquet").exists()
    assert "paper_gpu_hours" not in result  # a restricted run projects nothing


@pytest.mark.workflow
@pytest.mark.slow
def test_packed_mode_trains_k_cells_at_once_in_k_processes(tmp_path, monkeypatch):
    """Per (model, adversary): k cells at once, in k processes, under the MPS daemon it starts
    with ``--mps`` and stops at the end (ncrobust.mps is tested in test_mps.py; here it is recorded)."""
    calls = []
    monkeypatch.setattr("ncrobust.mps.start", lambda key: calls.append(("start", key)))
    monkeypatch.setattr("ncrobust.mps.stop", lambda key: calls.append(("stop", key)))
    result = gpu_cell.main(["--smoke", "--device", "cpu", "--packed", "1", "2", "--mps", "--models", "preact_resnet18",
                            "--adversaries", "st", "--workdir", str(tmp_path)])
    ips = result["packed_images_per_second"]
    assert set(ips) == {("preact_resnet18", "st", 1), ("preact_resnet18", "st", 2)} and all(v > 0 for v in ips.values())
    packed = tmp_path / "preact_resnet18" / "st" / "packed2"
    assert sorted(p.name for p in packed.iterdir()) == ["seed1", "seed2"]  # two cells, each trained
    assert all((packed / s / "epoch2.pt").exists() for s in ("seed1", "seed2"))
    assert [c[0] for c in calls] == ["start", "stop"] and calls[0][1] == calls[1][1]


def test_training_hours_with_k_cells_per_gpu_are_the_grids_epochs_at_the_packed_rate(tmp_path):
    paper = validate_config(yaml.safe_load((REPO_ROOT / "config" / "paper.yaml").read_text())
                            | {"data_root": str(stage_placeholders(tmp_path, "cifar10", "cifar100"))})
    epoch_s = {(m, a): 50000 / 5000 for m in gpu_cell.MODELS for a in gpu_cell.ADVERSARIES}  # 5,000 images/s in all
    assert gpu_cell.training_hours(paper, epoch_s) == pytest.approx(36 * 400 * 10.0 / 3600)


def test_projection_is_cells_times_epochs_evaluations_and_strong_evaluation(tmp_path):
    paper = validate_config(yaml.safe_load((REPO_ROOT / "config" / "paper.yaml").read_text())
                            | {"data_root": str(stage_placeholders(tmp_path, "cifar10", "cifar100"))})
    epoch_s = {(m, a): 1.0 for m in gpu_cell.MODELS for a in gpu_cell.ADVERSARIES}
    hours = gpu_cell.projected_hours(paper, epoch_s, {m: 10.0 for m in gpu_cell.MODELS}, {m: 100.0 for m in gpu_cell.MODELS})
    cells = 2 * 2 * 1 * 3 * 3  # datasets x models x losses x adversaries x seeds
    assert hours == pytest.approx(cells * (400 * 1.0 + len(paper["evaluation"]["epochs"]) * 10.0 + 100.0) / 3600)
    with pytest.raises(ValueError, match="no evaluation measured for vgg11_bn"):
        gpu_cell.projected_hours(paper, epoch_s, {"preact_resnet18": 10.0}, {m: 100.0 for m in gpu_cell.MODELS})


def test_the_precisions_are_paper_yamls_unless_overridden(tmp_path):
    """On a GPU the benchmark measures paper.yaml's fp32 training and attacks, or the bf16 opt-in
    with ``--precision bf16 --attack-precision bf16``; the CPU smoke test runs fp32."""
    stage_placeholders(tmp_path / "data", "cifar10")

    def precisions(**kw):
        options = dict(device="cuda", epochs=2, smoke=False, deterministic=False) | kw
        config = gpu_cell.benchmark_config(tmp_path / "data", **options)
        return config["precision"], config["evaluation"]["attack_precision"]

    assert precisions() == ("fp32", "fp32")
    assert precisions(attack_precision="bf16", precision="bf16") == ("bf16", "bf16")
    assert precisions(device="cpu", smoke=True) == ("fp32", "fp32")
