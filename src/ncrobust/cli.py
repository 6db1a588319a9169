"""``ncrobust``: the command line (a console script of the package).

    ncrobust measure WEIGHTS --dataset NAME [--arch A] ...   one network -> its metrics table
    ncrobust check-config FILE [FILE ...]                    check config files without Snakemake
    ncrobust config-reference                                every config key, as Markdown
    ncrobust collect [...]                                   the tables of a partial grid
    ncrobust findings {write,check,update} [...]             a run's findings block

The grid itself runs with ``snakemake`` (README); these are the entry points around it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from fractions import Fraction
from pathlib import Path

import yaml

DESCRIPTION = "Neural Collapse under adversarial perturbation: measure a network, check configs, collect results."


def _number(text: str) -> float:
    """A float, or a fraction such as 8/255 (how threat models are usually written)."""
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or a fraction: {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    return tuple(_number(part) for part in text.split(","))


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def measure_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        "measure", help="measure one network: NC1-NC4, NCC, leap rate and robust accuracy at every layer",
        description="Measure a trained network as the workflow measures a checkpoint: every tapped layer on each "
                    "split, clean and under each perturbation, into the workflow's tidy metrics table (Parquet), "
                    "and print the penultimate layer's summary. Inputs are images in [0, 1]; a network trained on "
                    "normalised inputs gets its normalisation with --mean/--std.",
        epilog="examples:\n"
               "  ncrobust measure results/runs/digits/mlp/ce/st/base/seed1/checkpoints/epoch60.pt --dataset digits\n"
               "  ncrobust measure Carmon2019Unlabeled.pt --arch wrn28_10 --format robustbench --dataset cifar10 "
               "--data-root data\n"
               "  ncrobust measure net.pt --arch torchvision:resnet18 --dataset cifar10 --mean 0.49,0.48,0.45 "
               "--std 0.25,0.24,0.26\n"
               "  ncrobust measure net.pt --arch mypackage.nets:SmallNet --dataset digits --taps features.0,features.2\n"
               "(docs/own-network.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    net = p.add_argument_group("the network")
    net.add_argument("weights", help="the weights file: an ncrobust checkpoint, a state dict, a RobustBench file, ...")
    net.add_argument("--arch", help="registry name (e.g. wrn28_10), torchvision:NAME, timm:NAME or package.module:callable "
                     "(default: an ncrobust checkpoint's own)")
    net.add_argument("--format", default="auto", help="auto (default), ncrobust, state_dict, robustbench, or module (a "
                     "whole pickled nn.Module: needs --trust)")
    net.add_argument("--option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                     help="an option of the architecture (repeatable), e.g. width=128")
    net.add_argument("--taps", type=_names, help="comma-separated module names to measure besides the penultimate "
                     "features (default: a registry model's own taps, none for other modules)")
    net.add_argument("--penultimate-only", action="store_true", help="measure the penultimate features only")
    net.add_argument("--classifier", help="the nn.Linear that makes the logits (default: the last nn.Linear)")
    net.add_argument("--mean", type=_floats, help="per-channel input mean the network expects (with --std)")
    net.add_argument("--std", type=_floats, help="per-channel input std the network expects (with --mean)")
    net.add_argument("--trust", action="store_true", help="allow a file that holds pickled code (loading it runs that "
                     "code): only for a file whose origin you trust")
    net.add_argument("--name", help="the model column of the table (default: the file's name)")
    net.add_argument("--adversary", default="st", help="how the network was trained, for the adversary column: st, "
                     "pgd-linf, pgd-l2, trades-linf, trades-l2 (default st); also the threat model's norm")
    data = p.add_argument_group("the data")
    data.add_argument("--dataset", required=True, help="a registered dataset (digits, mnist1d, mnist, fashion_mnist, "
                      "cifar10, cifar100, imagenette)")
    data.add_argument("--data-root", default="data", help="where pre-staged datasets are (default: data)")
    data.add_argument("--dataset-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                      help="a loader option (repeatable), e.g. train_per_class=100")
    data.add_argument("--splits", type=_names, default=("test",), help="comma-separated: train, test (default: test)")
    data.add_argument("--max-samples", type=int, help="measure the first N images of each split only")
    attack = p.add_argument_group("the attacks")
    attack.add_argument("--perturbations", type=_names, default=("clean", "pgd", "pgd-targeted", "gaussian"),
                        help="comma-separated, of clean, pgd, pgd-targeted, gaussian, sign, trades-kl "
                        "(default: clean,pgd,pgd-targeted,gaussian)")
    attack.add_argument("--norm", choices=("linf", "l2"), help="the threat model's norm (default: the adversary's, else linf)")
    attack.add_argument("--eps", type=_number, help="radius (default: 8/255 for linf, 0.5 for l2, or the config's)")
    attack.add_argument("--step-size", type=_number, help="PGD step (default: eps/4, or the config's)")
    attack.add_argument("--steps", type=int, help="PGD steps (default: 10, or the config's)")
    attack.add_argument("--configfile", nargs="+", default=[], help="take the dataset's options and threat models, the "
                        "perturbations' overrides and the model's options from these config files (as the workflow does)")
    run = p.add_argument_group("running")
    run.add_argument("--out", help="the metrics table to write (default: NAME.metrics.parquet)")
    run.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    run.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default: 500)")
    run.add_argument("--seed", type=int, default=0, help="seeds the attacks (default: 0)")
    return p


def _threat_and_data(args):
    """The threat model, the perturbations with their overrides and the dataset's loader options:
    from ``--configfile`` where it names the dataset, else the standard ones; flags win."""
    from ncrobust.attacks import ThreatModel
    from ncrobust.cell import Adversary
    from ncrobust.measure import STANDARD_THREATS

    norm = args.norm or Adversary.parse(args.adversary).norm
    overrides: dict = {}
    options: dict = {}
    threat = None
    args.model_options = {}
    if args.configfile:
        from ncrobust.collect import load_config

        config = load_config(args.configfile, [], ".")
        args.model_options = config.get("models", {})
        ds = config["datasets"].get(args.dataset)
        if ds is not None:
            norm = norm or ds["norm"]
            if norm in ds["threat"]:
                t = ds["threat"][norm]
                threat = ThreatModel(norm=norm, eps=float(t["eps"]), step_size=float(t["step_size"]), steps=int(t["steps"]))
            options = dict(ds.get("options") or {})
        overrides = config["evaluation"]["perturbations"]
    norm = norm or "linf"
    threat = threat or STANDARD_THREATS[norm]
    eps = threat.eps if args.eps is None else args.eps
    step = args.step_size if args.step_size is not None else (eps / 4 if args.eps is not None else threat.step_size)
    threat = ThreatModel(norm=norm, eps=eps, step_size=step, steps=threat.steps if args.steps is None else args.steps)
    perturbations = {name: dict(overrides.get(name) or {}) for name in args.perturbations}
    options.update(dict(args.dataset_option))
    return threat, perturbations, options


def _own_architecture(path: str, trust: bool) -> tuple[object, str | None]:
    """The file's contents (None when unreadable: reported when the network is loaded) and, for an
    ncrobust checkpoint, its registry model, to find its options in a config; the contents go on
    to the loader, so that the file is read once."""
    from ncrobust.models.external import NetworkError, checkpoint_architecture, read_file

    try:
        obj = read_file(path, trust=trust)
    except NetworkError:
        return None, None
    return obj, checkpoint_architecture(obj)


def run_measure(args) -> int:
    import torch
    from tqdm import tqdm

    from ncrobust import data as datasets
    from ncrobust.cell import Cell
    from ncrobust.io import write_parquet
    from ncrobust.jobs.experiment import input_shape, resolve_device
    from ncrobust.measure import measure, subset, summary_lines
    from ncrobust.models.adapter import check_classifier
    from ncrobust.models.external import NetworkSpec, load_network
    from ncrobust.tables import metrics_frame

    if args.threads:
        torch.set_num_threads(args.threads)
    threat, perturbations, options = _threat_and_data(args)
    seed = options.pop("split_seed", 0)
    data = subset(datasets.load(args.dataset, root=args.data_root, seed=seed, **options), args.max_samples)
    contents, arch = (None, args.arch) if args.arch else _own_architecture(args.weights, args.trust)
    options = {**(args.model_options.get(arch, {}) if arch else {}), **dict(args.option)}  # the config's, then the flags'
    spec = NetworkSpec(
        path=args.weights, architecture=arch, format=args.format, options=options, taps=args.taps,
        classifier=args.classifier, mean=args.mean, std=args.std, trust=args.trust,
    )
    model, epoch = load_network(spec, **input_shape(data), contents=contents)
    del contents
    device = resolve_device(args.device)
    model = model.to(device)
    probe, _ = datasets.as_float(data, "test", device)
    check_classifier(model, probe[: min(len(probe), 16)], len(data["classes"]))
    name = args.name or Path(args.weights).name.split(".")[0]
    out = Path(args.out or f"{name}.metrics.parquet")
    sets = len(args.splits) * len(dict.fromkeys(("clean", *perturbations)))
    sizes = " + ".join(f"{len(data['y_' + s])} {s}" for s in args.splits)
    print(f"{name}: {len(model.tap_names)} layers ({', '.join(model.tap_names)}), {args.dataset} "
          f"{sizes} images, {threat.norm} eps {threat.eps:.4g}, "
          f"PGD-{threat.steps} step {threat.step_size:.4g}, on {device}", file=sys.stderr)
    with tqdm(total=sets, desc="sets", unit="set", ascii=True, file=sys.stderr) as bar:
        results = measure(model, data, threat=threat, perturbations=perturbations, splits=args.splits,
                          layerwise=not args.penultimate_only, batch_size=args.batch_size, seed=args.seed, epoch=epoch,
                          device=device, on_set=lambda keys: (bar.set_postfix_str("/".join(keys)), bar.update()))
    cell = Cell(args.dataset, name, "ce", args.adversary, args.seed)
    write_parquet(metrics_frame(results, cell, epoch), out)
    print("\n".join(summary_lines(results)))
    print(f"wrote {out} ({len(results)} rows)")
    return 0


DELEGATED = {
    "collect": ("ncrobust.collect", "the tables of a partial grid, from the cells finished so far"),
    "findings": ("ncrobust.findings", "write, check or update a run's findings block"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:  # their own parsers (and --help)
        import importlib

        module = importlib.import_module(DELEGATED[argv[0]][0])
        return module.main(argv[1:])
    parser = argparse.ArgumentParser(prog="ncrobust", description=DESCRIPTION,
                                     epilog="`ncrobust COMMAND --help` for a command's options; the grid runs with snakemake")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    measure_parser(commands)
    check = commands.add_parser("check-config", help="check config files (merged in order) without Snakemake")
    check.add_argument("files", nargs="+", metavar="FILE")
    commands.add_parser("config-reference", help="print every config key with its type, default and meaning (Markdown)")
    for command, (_, help) in DELEGATED.items():
        commands.add_parser(command, help=help, add_help=False)
    args = parser.parse_args(argv)
    if args.command in ("check-config", "config-reference"):
        from ncrobust import config

        return config.main(args.files if args.command == "check-config" else ["--markdown"])
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from ncrobust.config import ConfigError
    from ncrobust.io import ExplainedError

    try:
        return run_measure(args)
    except (ExplainedError, ConfigError, FileNotFoundError) as err:
        print(f"ncrobust measure: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # bad input found by the library (a threat model, a perturbation, a loader option)
        print(f"ncrobust measure: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
