"""One paper cell at a time on full-size fake CIFAR-10, through the pipeline's own functions:
seconds per training epoch, per evaluation and per strong evaluation, and the projected GPU-hours
of config/paper.yaml.

    python benchmarks/gpu_cell.py                  # GPU: 50,000 + 10,000 fake images, 3 epochs per cell
    python benchmarks/gpu_cell.py --smoke          # a tiny version (default without a GPU): a smoke test
    python benchmarks/gpu_cell.py --precision bf16 --attack-precision bf16   # the bf16 opt-in (paper.yaml: fp32)
    python benchmarks/gpu_cell.py --epoch-measure off --train-only   # training without the per-epoch measurement
    python benchmarks/gpu_cell.py --packed 1 2 4 --models preact_resnet18 --adversaries pgd-linf
                                                   # k cells training at once on one GPU: aggregate images/s

The data are random images in the real on-disk format (tests/test_paper.py: ``write_fake_cifar10``):
learning curves mean nothing, timings do. Each cell runs ``prepare_data -> init_cell -> train_cell
(0 -> epochs) -> evaluate_cell -> robustness_cell`` with ``config/paper.yaml``'s settings (fp32
training and attacks, CUDA graphs, the authors' BatchNorm switches, deterministic kernels off)
unless overridden (``--precision``, ``--attack-precision``).

A training epoch's seconds come from the training log; epoch 1 pays the CUDA-graph capture and
cuDNN autotuning, so the table reports it apart and the projection uses the median of the later
epochs. Evaluation and strong evaluation are timed once per model (on the pgd-linf cell: every
cell is evaluated with the same perturbations); its ``attacks s`` and ``measure s`` columns split an
evaluation into the perturbations and the two statistics passes of every layer. The projection multiplies, per cell of the paper
grid, ``epochs x epoch seconds + len(evaluation.epochs) x evaluation seconds + strong seconds``
(CIFAR-100 costs what CIFAR-10 costs: same image count and networks but for the last layer), and
ignores job start-up and queueing.

``--packed k ...`` measures what ``group_training`` with ``--group-components train=k`` gives: k
processes (as a Snakemake job group runs them) train k cells (seeds 1..k) of the first model and
adversary at once on the one GPU; the aggregate images/s is k x training images / the median of
the processes' later-epoch seconds, printed against one cell alone.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # write_fake_cifar10 (tests/test_paper.py)

from ncrobust.cell import Cell  # noqa: E402
from ncrobust.config import validate_config  # noqa: E402
from ncrobust.evaluation import checkpoint as evaluation
from ncrobust.jobs.pipeline import evaluate_cell, init_cell, prepare_data, robustness_cell, train_cell  # noqa: E402

MODELS = ("preact_resnet18", "vgg11_bn")
ADVERSARIES = ("st", "pgd-linf", "trades-linf")


def benchmark_config(data_root: Path, *, device: str, epochs: int, smoke: bool, deterministic: bool,
                     attack_precision: str | None = None, precision: str | None = None,
                     epoch_measure: bool | None = None) -> dict:
    """config/paper.yaml restricted to fake CIFAR-10 and ``epochs`` epochs (tiny in smoke mode);
    ``precision`` and ``attack_precision`` override training's and the evaluation's (paper.yaml:
    fp32; always fp32 on the CPU unless given)."""
    config = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    config["data_root"], config["device"], config["results"] = str(data_root), device, str(data_root.parent / "results")
    config["datasets"]["cifar10"]["options"] = {"verify_checksums": False}
    config["grid"]["dataset"] = ["cifar10"]  # the fake data are CIFAR-10's (CIFAR-100 costs the same)
    config["training"].update(epochs=epochs, checkpoints=list(range(1, epochs + 1)), deterministic=deterministic)
    config["evaluation"].pop("epochs", None)
    if device == "cpu":
        config["precision"] = config["evaluation"]["attack_precision"] = "fp32"
    if attack_precision is not None:
        config["evaluation"]["attack_precision"] = attack_precision
    if precision is not None:
        config["precision"] = precision
    if epoch_measure is not None:
        config["training"]["epoch_measure"] = epoch_measure
    if smoke:
        config["threads"] = 1
        config["training"]["batch_size"] = 20
        config["datasets"]["cifar10"]["threat"]["linf"]["steps"] = 2
        config["models"] = {"preact_resnet18": {"width": 8}}
        config["evaluation"].update(batch_size=40, strong={"attacks": ["pgd-strong"], "max_samples": 4})
    return validate_config(config)


def _grid_cells(paper: dict):
    grid = paper["grid"]
    return itertools.product(*(grid[k] for k in ("dataset", "model", "loss", "adversary", "seed")))


def training_hours(paper: dict, epoch_s: dict) -> float:
    """GPU-hours of the paper grid's training from per-(model, adversary) GPU seconds per epoch."""
    seconds = 0.0
    for _dataset, model, _loss, adversary, _seed in _grid_cells(paper):
        if (model, adversary) not in epoch_s:
            raise ValueError(f"no measurement for {model} {adversary}: run without --models/--adversaries restrictions")
        seconds += paper["training"]["epochs"] * epoch_s[model, adversary]
    return seconds / 3600


def projected_hours(paper: dict, epoch_s: dict, eval_s: dict, strong_s: dict) -> float:
    """GPU-hours of the paper grid from per-(model, adversary) epoch seconds and per-model
    evaluation and strong-evaluation seconds (see the module docstring)."""
    evaluations = len(paper["evaluation"].get("epochs", [0, *paper["training"]["checkpoints"]]))
    seconds = 0.0
    for _dataset, model, _loss, _adversary, _seed in _grid_cells(paper):
        if model not in eval_s or model not in strong_s:
            raise ValueError(f"no evaluation measured for {model}: run without --models/--adversaries restrictions")
        seconds += evaluations * eval_s[model] + strong_s[model]
    return training_hours(paper, epoch_s) + seconds / 3600


class EvaluationPhases:
    """Seconds that evaluations spend attacking (``perturb``) and measuring (``_measure``, both
    passes of every layer): wraps the two in ``ncrobust.evaluation.checkpoint`` while in use, synchronising
    the device before and after each call (a few times per set: no cost worth counting)."""

    def __init__(self, device: str) -> None:
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.seconds = {"attacks": 0.0, "measure": 0.0}

    def _timed(self, phase: str, function):
        def run(*args, **kwargs):
            self.sync()
            started = time.perf_counter()
            out = function(*args, **kwargs)
            self.sync()
            self.seconds[phase] += time.perf_counter() - started
            return out

        return run

    def __enter__(self) -> "EvaluationPhases":
        self.saved = evaluation.perturb, evaluation._measure
        evaluation.perturb = self._timed("attacks", evaluation.perturb)
        evaluation._measure = self._timed("measure", evaluation._measure)
        return self

    def __exit__(self, *exc) -> None:
        evaluation.perturb, evaluation._measure = self.saved


def _train_one(config: dict, cell: Cell, data_path: str, run: str, epochs: int) -> list[float]:
    """One cell from its initialisation to ``epochs``; its epoch seconds (a process of --packed)."""
    Path(run).mkdir(parents=True, exist_ok=True)
    init_cell(config, cell, data_path, f"{run}/epoch0.pt")
    train_cell(config, cell, data_path, f"{run}/epoch0.pt", epochs, f"{run}/epoch{epochs}.pt", f"{run}/log.parquet",
               _epoch_metrics_out(config, run))
    return pd.read_parquet(f"{run}/log.parquet")["seconds"].tolist()


def _epoch_metrics_out(config: dict, run) -> str | None:
    """Where a training run writes Su et al.'s per-epoch measurement: paper.yaml measures every
    epoch (``training.epoch_measure``), so the epoch times include it, as in the workflow."""
    return f"{run}/epoch_metrics.parquet" if config["training"]["epoch_measure"] else None


def packed_throughput(config: dict, data_path: str, work: Path, model: str, adversary: str, epochs: int, k: int) -> float:
    """Aggregate training images/s of ``k`` cells trained at once by ``k`` processes on one device."""
    import multiprocessing

    cells = [Cell("cifar10", model, "ce", adversary, seed) for seed in range(1, k + 1)]
    runs = [str(work / f"packed{k}" / f"seed{c.seed}") for c in cells]
    with multiprocessing.get_context("spawn").Pool(k) as pool:
        seconds = pool.starmap(_train_one, [(config, c, data_path, r, epochs) for c, r in zip(cells, runs)])
    n_train = len(torch.load(data_path, weights_only=True)["y_train"])
    return k * n_train / statistics.median(s for per_cell in seconds for s in per_cell[1:])


def packed(args, config: dict, data_path: str, work: Path, data_root: Path, epochs: int) -> dict:
    """``--packed``: images/s in all of k cells at once, per (model, adversary); with every pair
    measured, the paper grid's training GPU-hours with each k cells per GPU."""
    from ncrobust import mps

    key = f"gpu_cell{os.getpid()}"
    if args.mps:
        mps.start(key)  # the spawned processes inherit its variables
    try:
        result = {}
        for model, adversary in itertools.product(args.models, args.adversaries):
            for k in args.packed:
                result[model, adversary, k] = ips = packed_throughput(config, data_path, work / model / adversary, model, adversary, epochs, k)
                print(f"{model} {adversary}: {k} cell(s) at once on one device{' under MPS' if args.mps else ''}: "
                      f"{ips:,.0f} images/s in all ({ips / result[model, adversary, args.packed[0]]:.2f} x {args.packed[0]})", flush=True)
    finally:
        if args.mps:
            mps.stop(key)
    if set(args.models) == set(MODELS) and set(args.adversaries) == set(ADVERSARIES):
        paper = validate_config(yaml.safe_load((ROOT / "config" / "paper.yaml").read_text()) | {"data_root": str(data_root)})
        n_train = len(torch.load(data_path, weights_only=True)["y_train"])
        for k in args.packed:  # GPU seconds per cell-epoch: n_train / (images/s in all)
            hours = training_hours(paper, {(m, a): n_train / result[m, a, k] for m, a, kk in result if kk == k})
            print(f"config/paper.yaml training with {k} cell(s) per GPU: {hours:.1f} GPU-hours")
    return {"packed_images_per_second": result}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny data and networks (default on the CPU)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per cell (default 3; smoke 2)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--adversaries", nargs="+", default=list(ADVERSARIES), choices=ADVERSARIES)
    parser.add_argument("--deterministic", action="store_true", help="deterministic kernels (paper.yaml: off)")
    parser.add_argument("--attack-precision", choices=("fp32", "bf16"), default=None,
                        help="the evaluation's attacks (default: paper.yaml's, fp32)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="training and its attacks (default: paper.yaml's, fp32)")
    parser.add_argument("--epoch-measure", choices=("on", "off"), default=None,
                        help="the authors' per-epoch measurement during training (paper.yaml: on)")
    parser.add_argument("--train-only", action="store_true", help="time the training epochs only (no evaluations, no projection)")
    parser.add_argument("--packed", type=int, nargs="+", default=None, metavar="K",
                        help="instead: aggregate images/s of K cells training at once, for every --models x --adversaries")
    parser.add_argument("--mps", action="store_true", help="with --packed: the K processes share the GPU through a CUDA MPS daemon")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the files here (default: a temporary directory)")
    args = parser.parse_args(argv)
    smoke = args.smoke or args.device == "cpu"
    epochs = args.epochs or (2 if smoke else 3)
    if epochs < 2:
        parser.error("--epochs must be >= 2 (epoch 1 pays the capture and autotuning)")
    from test_paper import write_fake_cifar10

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        data_root = work / "data"
        if not (data_root / "cifar-10-batches-py").exists():
            write_fake_cifar10(data_root, **({} if smoke else {"n_train_per_file": 10000, "n_test": 10000}))
        config = benchmark_config(data_root, device=args.device, epochs=epochs, smoke=smoke, deterministic=args.deterministic,
                                  attack_precision=args.attack_precision, precision=args.precision,
                                  epoch_measure=None if args.epoch_measure is None else args.epoch_measure == "on")
        data_path = str(work / "cifar10.pt")
        prepare_data(config, "cifar10", data_path)
        print(f"device {args.device}{' (smoke)' if smoke else ''}, precision {config['precision']}, "
              f"attack precision {config['evaluation']['attack_precision']}, "
              f"deterministic {config['training']['deterministic']}, epoch_measure {config['training']['epoch_measure']}, cuda_graph {config['training']['cuda_graph']}, "
              f"{epochs} epochs per cell")
        if args.packed:
            return packed(args, config, data_path, work, data_root, epochs)
        print(f"{'model':<16} {'adversary':<12} {'epoch 1 s':>10} {'epoch s':>9} {'eval s':>8} {'strong s':>9}"
              f" {'attacks s':>10} {'measure s':>10}")
        epoch_s, eval_s, strong_s, phase_s = {}, {}, {}, {}
        for model, adversary in itertools.product(args.models, args.adversaries):
            cell = Cell("cifar10", model, "ce", adversary, 1)
            run = work / model / adversary
            run.mkdir(parents=True, exist_ok=True)
            init_cell(config, cell, data_path, str(run / "epoch0.pt"))
            train_cell(config, cell, data_path, str(run / "epoch0.pt"), epochs, str(run / f"epoch{epochs}.pt"), str(run / "log.parquet"),
                       _epoch_metrics_out(config, run))
            seconds = pd.read_parquet(run / "log.parquet")["seconds"].tolist()
            epoch_s[model, adversary] = statistics.median(seconds[1:])
            line = f"{model:<16} {adversary:<12} {seconds[0]:>10.2f} {epoch_s[model, adversary]:>9.2f}"
            if not args.train_only and (adversary == "pgd-linf" or (adversary == args.adversaries[-1] and model not in eval_s)):
                started = time.perf_counter()
                with EvaluationPhases(args.device) as phases:
                    evaluate_cell(config, cell, data_path, str(run / f"epoch{epochs}.pt"), str(run / "metrics.parquet"), str(run / "projection.parquet"))
                eval_s[model] = time.perf_counter() - started
                phase_s[model] = phases.seconds
                started = time.perf_counter()
                robustness_cell(config, cell, data_path, str(run / f"epoch{epochs}.pt"), str(run / "robustness.parquet"))
                strong_s[model] = time.perf_counter() - started
                line += f" {eval_s[model]:>8.2f} {strong_s[model]:>9.2f} {phase_s[model]['attacks']:>10.2f} {phase_s[model]['measure']:>10.2f}"
            print(line, flush=True)
        result = {"epoch_seconds": epoch_s, "evaluation_seconds": eval_s, "strong_seconds": strong_s,
                  "evaluation_phase_seconds": phase_s}
        if not args.train_only and set(args.models) == set(MODELS) and set(args.adversaries) == set(ADVERSARIES):
            paper = validate_config(yaml.safe_load((ROOT / "config" / "paper.yaml").read_text()) | {"data_root": str(data_root)})
            result["paper_gpu_hours"] = projected_hours(paper, epoch_s, eval_s, strong_s)
            scale = " (smoke: tiny data, meaningless)" if smoke else ""
            print(f"projected config/paper.yaml: {result['paper_gpu_hours']:.1f} GPU-hours on this device{scale}")
    return result


if __name__ == "__main__":
    main()
