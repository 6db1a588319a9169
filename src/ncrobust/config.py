"""Config validation at parse time: a JSON schema, then the checks a schema cannot express.

A bad config raises :class:`ConfigError` with one line naming the key, the value and what is
allowed, before any job starts. Defaults from the schema are filled in.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import jsonschema
import yaml

from ncrobust.cell import BASE_VARIANT, Adversary
from ncrobust.columns import PENULTIMATE
from ncrobust.stages import VARIANT_FIXED_TRAINING, VARIANT_ONLY, merge, variant_overrides

# Shipped inside the package (a non-editable install has no workflow/ beside it);
# workflow/schemas/config.schema.yaml is a link to it, where the workflow template keeps schemas.
SCHEMA_PATH = Path(__file__).resolve().with_name("config.schema.yaml")
REAL_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagenette")
# What a model is built for, per dataset, as the loaders produce it: (channels, image side, classes);
# imagenette's side is its `image_size` option. Lets model options be checked without the data.
DATASET_SHAPES = {
    "digits": (1, 8, 10),
    "mnist": (1, 28, 10),
    "fashion_mnist": (1, 28, 10),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "imagenette": (3, None, 10),
    "mnist1d": (1, (1, 40), 10),  # sequences of length 40, stored as one-row images
}
# Loader keywords the workflow sets itself, and options it handles before the loader.
_LOADER_ARGUMENTS = ("root", "download", "seed")
_WORKFLOW_OPTIONS = ("split_seed",)


class ConfigError(ValueError):
    """A config value is not allowed; the message is one line: key, value, what is allowed."""


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _explain(error: jsonschema.ValidationError) -> str:
    key, value, v, arg = _key(error.absolute_path), error.instance, error.validator, error.validator_value
    if v == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(value) - set(allowed)) if isinstance(value, dict) else []
        where = f" under {key}" if error.absolute_path else ""
        return f"unknown key {', '.join(map(repr, extra))}{where}; allowed: {', '.join(allowed)}"
    if v == "required":
        missing = [k for k in arg if k not in value]
        return f"missing key {_key([*error.absolute_path, missing[0]])}"
    if "propertyNames" in error.schema_path and v in ("pattern", "not"):  # a name refused by a pattern or a `not`
        return f"{key}: the name {value!r} is not allowed ({'reserved' if v == 'not' else 'use lower-case letters, digits and _ . + -'})"
    if v == "propertyNames":
        allowed = error.schema["propertyNames"].get("enum", [])
        return f"{key}: unknown name {error.instance!r}; allowed: {', '.join(allowed)}"
    if v == "enum":
        return f"{key} = {value!r}: not allowed; allowed: {', '.join(map(str, arg))}"
    if v == "type":
        return f"{key} = {value!r}: must be of type {arg if isinstance(arg, str) else ' or '.join(arg)}"
    if v in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[v]
        return f"{key} = {value!r}: must be {op} {arg}"
    if v == "minItems":
        return f"{key} = {value!r}: must have at least {arg} item(s)"
    if v == "uniqueItems":
        return f"{key} = {value!r}: duplicate entries are not allowed"
    if v == "minProperties":
        return f"{key} = {value!r}: must name at least {arg} entry"
    return f"{key} = {value!r}: {error.message}"


def _fill_defaults(instance, schema, root):
    """Insert schema ``default`` values for missing object properties (recursively)."""
    if "$ref" in schema:
        schema = root["definitions"][schema["$ref"].split("/")[-1]]
    if isinstance(instance, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in instance and "default" in sub:
                instance[name] = copy.deepcopy(sub["default"])
            if name in instance:
                _fill_defaults(instance[name], sub, root)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, value in instance.items():
                if name not in schema.get("properties", {}):
                    _fill_defaults(value, extra, root)


def load_config_file(path: str | os.PathLike) -> dict:
    """A YAML config file as a dict; a missing or unreadable file, a YAML syntax error (with its
    line and column) or a file that is not a mapping is one :class:`ConfigError` line naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (give an existing file to --configfile)") from None
    except OSError as err:
        raise ConfigError(f"{path}: config file cannot be read ({err.strerror})") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        raise ConfigError(f"{where}: YAML syntax error: {problem}{f' ({context})' if context else ''}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config file must be a YAML mapping (key: value), got {type(config).__name__}")
    return config


def _typed(value):
    """A scalar string as YAML would type it (``"3"`` -> 3, ``"1e-3"`` -> 0.001, ``"true"`` -> True)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, (bool, int, float)) or parsed is None:
        return parsed
    try:
        return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    except ValueError:
        return value


def typed_overrides(overrides: Mapping) -> dict:
    """``--config`` overrides with YAML's types. Snakemake parses a nested value such as
    ``--config training='{"epochs": 3, "checkpoints": [3]}'`` with YAML's BaseLoader, which leaves
    every scalar inside a string (``"3"``); a top-level value is already typed."""
    return {key: _typed(value) for key, value in overrides.items()}


def _coerce_numbers(instance, schema, root):
    """Return ``instance`` with integers at schema ``type: number`` places turned into floats, so
    that ``eps: 1`` and ``eps: 1.0`` are the same config: a job reruns when the text of its config
    slice changes (:mod:`ncrobust.stages`), and ``repr(1) != repr(1.0)``. Dicts and lists are
    updated in place."""
    if "$ref" in schema:
        schema = root["definitions"][schema["$ref"].split("/")[-1]]
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types or []
    if "number" in types and "integer" not in types and isinstance(instance, int) and not isinstance(instance, bool):
        return float(instance)
    if isinstance(instance, dict):
        extra = schema.get("additionalProperties")
        for name, value in instance.items():
            sub = schema.get("properties", {}).get(name, extra if isinstance(extra, dict) else None)
            if sub is not None:
                instance[name] = _coerce_numbers(value, sub, root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        instance[:] = [_coerce_numbers(value, schema["items"], root) for value in instance]
    return instance


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


def validate_config(config: dict, *, schema_path: str | Path = SCHEMA_PATH, base_dir: str | Path = ".") -> dict:
    """Validate ``config``, fill defaults, and return it; raise :class:`ConfigError` on the first problem."""
    schema = load_schema(schema_path)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise ConfigError(_explain(errors[0]))
    config = copy.deepcopy(config)
    _fill_defaults(config, schema, schema)
    _coerce_numbers(config, schema, schema)
    _check_semantics(config, Path(base_dir))
    _check_variants(config, schema_path, Path(base_dir))
    return config


def _check_variants(config: dict, schema_path, base_dir: Path) -> None:
    """Each variant of ``grid.variant`` is defined, and the config with it applied to every grid
    dataset and model validates like any config (so a variant's option names, types and ranges
    get the same one-line errors, prefixed with the variant), and a variant restricted to some
    adversaries or losses has at least one of each in the grid."""
    defined = config["variants"]
    for name in config["grid"]["variant"]:
        if name != BASE_VARIANT and name not in defined:
            raise ConfigError(
                f"grid.variant: unknown variant {name!r}; define it under variants (defined: {', '.join(sorted(defined)) or 'none'})"
            )
    for name in config["grid"]["variant"]:
        if name == BASE_VARIANT:
            continue
        for field, axis in VARIANT_ONLY.items():
            only = defined[name].get(field)
            if only is not None and not set(only) & set(config["grid"][axis]):
                raise ConfigError(
                    f"variants.{name}.{field} = {only}: none is in grid.{axis} ({', '.join(config['grid'][axis])}); "
                    f"the variant would have no cells (add one of them to grid.{axis}, or to the variant's {field})"
                )
        fixed = sorted(set(defined[name].get("training", {})) & set(VARIANT_FIXED_TRAINING))
        if fixed:
            raise ConfigError(f"variants.{name}.training.{fixed[0]}: {VARIANT_FIXED_TRAINING[fixed[0]]}; set it in training, not in a variant")
        applied = merge(config, *(variant_overrides(config, name, ds, m) for ds in config["grid"]["dataset"] for m in config["grid"]["model"]))
        applied["grid"] = {**applied["grid"], "variant": [BASE_VARIANT]}
        applied["variants"] = {}
        try:
            validate_config(applied, schema_path=schema_path, base_dir=base_dir)
        except ConfigError as err:
            raise ConfigError(f"variants.{name}: {err}") from None


def _check_semantics(config: dict, base_dir: Path) -> None:
    _check_finite(config)
    _check_results_path(config, base_dir)
    training = config["training"]
    epochs, checkpoints = training["epochs"], training["checkpoints"]
    if checkpoints != sorted(checkpoints):
        raise ConfigError(f"training.checkpoints = {checkpoints}: must be increasing")
    if checkpoints[-1] != epochs or checkpoints[0] < 1:
        raise ConfigError(f"training.checkpoints = {checkpoints}: must lie in 1..{epochs} and end at training.epochs = {epochs}")
    if training["epoch_measure"] and training.get("mixup", {}).get("alpha"):
        raise ConfigError("training.epoch_measure with training.mixup: a mixed input has no one label to group it by; switch one of them off")
    schedule = training["schedule"]
    if len(schedule["milestones"]) != len(schedule["factors"]):
        raise ConfigError(
            f"training.schedule.factors = {schedule['factors']}: needs one factor per milestone ({schedule['milestones']})"
        )
    evaluation = config["evaluation"]
    allowed_epochs = [0, *checkpoints]
    for e in evaluation.get("epochs", []):
        if e not in allowed_epochs:
            raise ConfigError(f"evaluation.epochs: {e} is not a checkpoint epoch; allowed: {allowed_epochs}")
    datasets = config["datasets"]
    _check_external(config, base_dir)
    external = config["external"]
    for ds in dict.fromkeys([*config["grid"]["dataset"], *(entry["dataset"] for entry in external.values())]):
        where = "grid.dataset" if ds in config["grid"]["dataset"] else f"external.{next(n for n, e in external.items() if e['dataset'] == ds)}.dataset"
        if ds not in datasets:
            raise ConfigError(f"{where} = {ds!r}: no entry datasets.{ds} (threat models) in the config")
        threat = datasets[ds]["threat"]
        adversaries = [Adversary.parse(a) for a in config["grid"]["adversary"] if ds in config["grid"]["dataset"]]
        adversaries += [Adversary.parse(e["adversary"]) for e in external.values() if e["dataset"] == ds]
        needed = {a.norm for a in adversaries if a.norm is not None}
        if any(a.kind == "st" for a in adversaries):
            needed.add(datasets[ds]["norm"])
            needed.update(config["evaluation"].get("norms", []))
        for norm in sorted(needed):
            if norm not in threat:
                raise ConfigError(f"datasets.{ds}.threat has no {norm!r} threat model; needed by the grid's adversaries")
        if ds in REAL_DATASETS and not config["download"]:
            root = Path(config["data_root"])
            root = root if root.is_absolute() else base_dir / root
            if not root.is_dir():
                raise ConfigError(
                    f"data_root = {config['data_root']!r}: directory does not exist; dataset {ds!r} needs it "
                    "(pre-stage the dataset there, or set download: true on a machine with internet)"
                )
            from ncrobust.data import missing_staged_files

            lacking = missing_staged_files(ds, root)
            if lacking:
                raise ConfigError(f"data_root = {config['data_root']!r}: {lacking}")
    _check_dataset_options(config)
    _check_model_options(config)
    _check_related(config)


def _check_external(config: dict, base_dir: Path) -> None:
    """Each external network's name is free (no grid model has it: it is its cell's model) and its
    weights file exists (an input of its cell, like prepared data)."""
    for name, entry in config["external"].items():
        if name in config["grid"]["model"]:
            raise ConfigError(f"external.{name}: the name of a grid model; name the network otherwise (it is its cells' model)")
        path = Path(entry["path"])
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise ConfigError(f"external.{name}.path = {entry['path']!r}: no such file (relative paths start at the directory "
                              "snakemake runs in)")
        if (entry["mean"] is None) != (entry["std"] is None):
            raise ConfigError(f"external.{name}: give both mean and std of the input normalisation, or neither")


def _check_related(config: dict) -> None:
    """The class pairs of the mixup geometry exist in every grid dataset, and the probe's layer is
    a tap of every grid model (checked here, not when the job runs after training)."""
    geometry = config["evaluation"]["mixup_geometry"]
    if geometry["enabled"]:
        for ds in config["grid"]["dataset"]:
            classes = _model_input(ds, config["datasets"][ds]["options"])[2]
            for pair in geometry["pairs"]:
                i, j = pair
                if i == j or max(i, j) >= classes:
                    raise ConfigError(
                        f"evaluation.mixup_geometry.pairs: {pair} is not a pair of two classes of {ds} (0..{classes - 1})"
                    )
    probe = config["probe"]
    if probe["enabled"] and probe["layer"] != PENULTIMATE:
        for ds in config["grid"]["dataset"]:
            chans, side, classes = _model_input(ds, config["datasets"][ds]["options"])
            for name in config["grid"]["model"]:
                kwargs = json.dumps(config["models"].get(name, {}), sort_keys=True)
                taps = _model_taps(name, kwargs, chans, side, classes)
                if probe["layer"] not in taps:
                    raise ConfigError(f"probe.layer = {probe['layer']!r}: not a tap of {name}; its taps: {', '.join(taps)}")


INT64 = (-(2**63), 2**63 - 1)
"""The integers torch and the random generators accept (a seed of 2**64 fails inside a job)."""


def _check_finite(node, path=()) -> None:
    """NaN and infinity pass a schema's ranges (every comparison with NaN is false), and integers
    beyond 64 bits pass them too but fail in torch: refuse them anywhere."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_finite(value, (*path, i))
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{_key(path)} = {node!r}: must be a finite number")
    elif isinstance(node, int) and not isinstance(node, bool) and not INT64[0] <= node <= INT64[1]:
        raise ConfigError(f"{_key(path)} = {node}: must lie in {INT64[0]}..{INT64[1]} (a 64-bit integer, what torch and the random generators accept)")


def _check_results_path(config: dict, base_dir: Path) -> None:
    """The results directory can be created and written: its nearest existing ancestor is a
    writable directory (not a regular file)."""
    results = Path(config["results"])
    path = results if results.is_absolute() else base_dir / results
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a regular file" if existing.is_file() else "is not a directory"
        raise ConfigError(f"results = {config['results']!r}: {existing} {what}; choose another results directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"results = {config['results']!r}: {existing} is not writable by this user; "
            "choose a results directory you can write"
        )


def _loader_options(dataset: str) -> dict[str, inspect.Parameter]:
    """The options of a dataset's loader (its keyword parameters the workflow does not set)."""
    from ncrobust import data

    params = inspect.signature(data.loader(dataset)).parameters
    return {name: p for name, p in params.items() if name not in _LOADER_ARGUMENTS}


def _check_dataset_options(config: dict) -> None:
    """Option names against each loader's keywords (ranges are in the schema)."""
    for dataset in config["grid"]["dataset"]:
        options = config["datasets"][dataset]["options"]
        if not options:
            continue  # nothing to check, and no need to import the loaders (and torch) for it
        allowed = [*_loader_options(dataset), *_WORKFLOW_OPTIONS]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ConfigError(
                f"datasets.{dataset}.options: unknown option {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
            )


def _model_input(dataset: str, options: dict) -> tuple[int, int | tuple[int, int], int]:
    chans, side, classes = DATASET_SHAPES[dataset]
    if side is None:
        side = options.get("image_size", _loader_options(dataset)["image_size"].default)
    return chans, side, classes


def _check_model_options(config: dict) -> None:
    """Each grid model with its ``models.<name>`` options is built (on the CPU, once per input
    shape) for each grid dataset, so that an unknown option or a value the constructor refuses
    (``depth: 0``, a ``convnet`` that pools a small image to nothing) stops here, not in a job.
    A dataset of non-square inputs (``mnist1d``) has every grid model built, options or not: a
    model for square images is refused here."""
    options = config["models"]
    datasets = config["grid"]["dataset"]
    sequences = [ds for ds in datasets if isinstance(DATASET_SHAPES[ds][1], tuple)]
    if not options and not sequences:
        return  # every model with its constructor's defaults (and no torch import at parse time)
    from ncrobust.models import list_models
    from ncrobust.models.registry import any_shape_models

    known = list_models()
    for name in options:
        if name not in known:
            raise ConfigError(f"models.{name}: unknown model; known: {', '.join(known)}")
    for ds in sequences:
        for name in config["grid"]["model"]:
            if name not in any_shape_models():
                raise ConfigError(
                    f"grid.model = {name!r}: builds square images, not {ds}'s sequences; use one of "
                    f"{', '.join(any_shape_models())} (or a grid without {ds})"
                )
    shapes = sorted({_model_input(ds, config["datasets"][ds]["options"]) for ds in datasets}, key=repr)
    for name in config["grid"]["model"]:
        kwargs = options.get(name, {})
        for chans, side, classes in shapes:
            if kwargs or isinstance(side, tuple):  # else the constructor's defaults, built in the tests
                _model_taps(name, json.dumps(kwargs, sort_keys=True), chans, side, classes)


@functools.lru_cache(maxsize=None)
def _model_taps(name: str, kwargs_json: str, chans: int, side: int | tuple[int, int], classes: int) -> tuple[str, ...]:
    """The tap names of grid model ``name`` built with its options (JSON) on the CPU for one input
    shape, or a :class:`ConfigError`. Once per process (each grid variant is validated as a whole
    config, and most share the base model's options); the model itself is not kept."""
    import torch

    from ncrobust.models import create_model

    kwargs = json.loads(kwargs_json)
    shape = dict(num_classes=classes, in_chans=chans, image_size=side, mean=[0.5] * chans, std=[0.25] * chans)
    with torch.random.fork_rng(devices=[]):
        try:
            return tuple(create_model(name, **shape, **kwargs).tap_names)
        except ValueError as err:
            if str(err).startswith("unknown option"):
                raise ConfigError(f"models.{name}: {err}") from None
            hw = side if isinstance(side, tuple) else (side, side)
            raise ConfigError(f"models.{name} = {kwargs!r}: {err} (for {chans}x{hw[0]}x{hw[1]} images)") from None
        except TypeError as err:  # a value of the wrong type reaching the constructor
            raise ConfigError(f"models.{name} = {kwargs!r}: {err}") from None


# ---------------------------------------------------------------------------------------------
# config/README.md: every key of the schema, generated (`python -m ncrobust.config --markdown`)

REFERENCE_INTRO = """\
# Configuration

The workflow reads one config file. Without `--configfile` it is the embedded default,
`config/config.yaml`; a file given with `--configfile` replaces it (it is not merged into it, so a
key left out takes the schema's default below, not the default file's value). Single keys can be
overridden on the command line with `--config`, e.g. `--config threads=2` or
`--config training='{"epochs": 30, "checkpoints": [10, 30]}'` (nested values are merged).

| file | what it runs | command |
| --- | --- | --- |
| `config/config.yaml` | the embedded default: digits, an MLP, `ce` and `mse`, `st`/`pgd-linf`/`trades-linf`, 2 seeds, on a CPU in minutes | `snakemake --cores 2` |
| `config/imbalance.yaml` | class imbalance (ratios 1, 10, 100) with and without the classifier's bias, on digits | `snakemake --cores 2 --configfile config/imbalance.yaml` |
| `config/related.yaml` | mixup and normalized features next to the base recipe, with the mixup geometry and the near-collapse probe, on digits | `snakemake --cores 2 --configfile config/related.yaml` |
| `config/mnist1d.yaml` | Su et al.'s questions on MNIST-1D (a published benchmark generated offline), an MLP and a 1-D CNN | `snakemake --cores 2 --configfile config/mnist1d.yaml` |
| `config/kernel.yaml` | the kernel and spectrum views (empirical NTK through training, power-law spectra) on digits | `snakemake --cores 2 --configfile config/kernel.yaml` |
| `config/paper.yaml` | Su et al.'s grid at full scale: CIFAR-10/100, PreActResNet18 and VGG11-BN, 400 epochs, 3 seeds, on a SLURM GPU cluster | `snakemake --cores 8 --profile slurm --configfile config/paper.yaml --group-components train=2` |

To write your own, copy the closest one and change it. `python -m ncrobust.config FILE` checks a
file without Snakemake (one line per problem, naming the key, the value and what is allowed);
the workflow runs the same checks before any job starts.

Every key below, with its type, its default (filled in when the key is absent) and what it
allows. `<dataset>`, `<model>`, `<name>` and `<perturbation>` stand for a map's own keys.
A `required` key has no default and must be given wherever its section is. This page is generated from the schema
(`src/ncrobust/config.schema.yaml`, which `workflow/schemas/config.schema.yaml` links to) by
`python -m ncrobust.config --markdown > config/README.md`; `tests/test_config.py` checks that it
is up to date and that every key has a description.
"""

# The placeholder a map's key is written as, by the map's path.
_MAP_KEYS = {"variants": "<name>", "datasets": "<dataset>", "models": "<model>", "evaluation.perturbations": "<perturbation>"}


def _resolve(node: dict, root: dict) -> dict:
    """A property's schema with a ``$ref`` replaced by the definition (the property's own keys,
    e.g. its description and default, win)."""
    if "$ref" not in node:
        return node
    target = root["definitions"][node["$ref"].split("/")[-1]]
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def schema_properties(schema: dict | None = None) -> list[tuple[str, dict, bool]]:
    """Every property of the schema in document order, ``$ref`` resolved: (key path, its schema,
    whether its parent requires it). Map entries (``additionalProperties`` schemas) are written
    with a placeholder key (``datasets.<dataset>.norm``)."""
    root = load_schema() if schema is None else schema
    rows: list[tuple[str, dict, bool]] = []

    def walk(node: dict, path: str) -> None:
        node = _resolve(node, root)
        required = set(node.get("required", []))
        for name, sub in node.get("properties", {}).items():
            key = f"{path}.{name}" if path else name
            rows.append((key, _resolve(sub, root), name in required))
            walk(sub, key)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            walk(extra, f"{path}.{_MAP_KEYS.get(path, '<key>')}")

    walk(root, "")
    return rows


def _type(node: dict) -> str:
    types = node.get("type", "object" if "properties" in node else "any")
    types = [types] if isinstance(types, str) else list(types)
    out = []
    for t in types:
        if t == "array":
            items = node.get("items", {})
            inner = _type(items) if isinstance(items, dict) and items else "any"
            out.append(f"list of {inner}")
        elif t == "object" and "propertyNames" in node or t == "object" and "properties" not in node and isinstance(node.get("additionalProperties"), dict):
            out.append("map")
        else:
            out.append(t)
    return " or ".join(out)


def _bounds(node: dict) -> list[str]:
    ops = (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))
    found = [f"{op} {node[k]}" for k, op in ops if k in node]
    if "minLength" in node:
        found.append("non-empty" if node["minLength"] == 1 else f"at least {node['minLength']} characters")
    return found


def _allowed(node: dict) -> str:
    parts = []
    if "enum" in node:
        parts.append(", ".join(f"`{v}`" for v in node["enum"]))
    parts += _bounds(node)
    items = node.get("items")
    if isinstance(items, dict):
        if "enum" in items:
            parts.append("each of " + ", ".join(f"`{v}`" for v in items["enum"]))
        parts += [f"each {b}" for b in _bounds(items)]
        if isinstance(items.get("items"), dict):
            parts += [f"each {b}" for b in _bounds(items["items"])]
    if "minItems" in node:
        parts.append(f"at least {node['minItems']} item{'s' if node['minItems'] > 1 else ''}")
    if "maxItems" in node:
        parts.append(f"at most {node['maxItems']} items")
    if node.get("uniqueItems"):
        parts.append("no duplicates")
    names = node.get("propertyNames", {})
    if "enum" in names:
        parts.append("keys: " + ", ".join(f"`{v}`" for v in names["enum"]))
    if "pattern" in names:
        parts.append(f"keys match `{names['pattern']}`")
    if "const" in names.get("not", {}):
        parts.append(f"not `{names['not']['const']}`")
    if "minProperties" in node:
        parts.append(f"at least {node['minProperties']} key{'s' if node['minProperties'] > 1 else ''}")
    return "; ".join(parts)


def _cell(text: str) -> str:
    """Text for a Markdown table cell: one line, pipes escaped, and outside code spans nothing
    read as markup (``<name>`` as an HTML tag, ``a * b`` as emphasis)."""
    parts = " ".join(str(text).split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # the even parts lie outside code spans
        parts[i] = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", parts[i]).replace("*", "\\*")
    return "`".join(parts)


def config_reference(schema: dict | None = None) -> str:
    """config/README.md: how to use the shipped configs, then every schema property, one table
    per top-level section: key, type, default, allowed values, description. Raises
    :class:`ValueError` naming any property without a description."""
    root = load_schema() if schema is None else schema
    rows = schema_properties(root)
    missing = [key for key, node, _ in rows if not node.get("description")]
    if missing:
        raise ValueError(f"schema properties without a description: {', '.join(missing)}")
    sections: dict[str, list[str]] = {}
    for key, node, required in rows:
        top = key.split(".")[0] if "." in key or "properties" in node or node.get("type") == "object" else ""
        if "default" in node:
            default = f"`{json.dumps(node['default'])}`"
        else:
            default = "required" if required else "not set"
        line = f"| `{key}` | {_cell(_type(node))} | {_cell(default)} | {_cell(_allowed(node))} | {_cell(node['description'])} |"
        sections.setdefault(top, []).append(line)
    header = "| key | type | default | allowed | description |\n| --- | --- | --- | --- | --- |"
    out = [REFERENCE_INTRO.rstrip("\n"), "", "## Top-level keys", "", _cell(root.get("description", "")), "", header, *sections.pop("")]
    for top, lines in sections.items():
        out += ["", f"## `{top}`", "", header, *lines]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m ncrobust.config FILE [FILE ...]``: check config files (merged in order, as
    ``--configfile A B``) without Snakemake; one line per problem, exit status 1 if any.
    ``python -m ncrobust.config --markdown``: print config/README.md (every key of the schema)."""
    files = sys.argv[1:] if argv is None else argv
    if files == ["--markdown"]:
        sys.stdout.write(config_reference())
        return 0
    if not files:
        print("usage: python -m ncrobust.config FILE [FILE ...]  |  python -m ncrobust.config --markdown", file=sys.stderr)
        return 2
    try:
        config: dict = {}
        for f in files:
            config = merge(config, load_config_file(f))
        validate_config(config)
    except ConfigError as err:
        print(f"ncrobust: config error: {err}", file=sys.stderr)
        return 1
    print(f"{' + '.join(files)}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
