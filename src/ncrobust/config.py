"""Config validation at parse time: a JSON schema, then the checks a schema cannot express.

A bad config raises :class:`ConfigError` with one line naming the key, the value and what is
allowed, before any job starts. Defaults from the schema are filled in.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
REAL_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagenette")


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
    return config


def _check_semantics(config: dict, base_dir: Path) -> None:
    training = config["training"]
    epochs, checkpoints = training["epochs"], training["checkpoints"]
    if checkpoints != sorted(checkpoints):
        raise ConfigError(f"training.checkpoints = {checkpoints}: must be increasing")
    if checkpoints[-1] != epochs or checkpoints[0] < 1:
        raise ConfigError(f"training.checkpoints = {checkpoints}: must lie in 1..{epochs} and end at training.epochs = {epochs}")
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
    for ds in config["grid"]["dataset"]:
        if ds not in datasets:
            raise ConfigError(f"grid.dataset = {ds!r}: no entry datasets.{ds} (threat models) in the config")
        threat = datasets[ds]["threat"]
        needed = {a.split("-")[1] for a in config["grid"]["adversary"] if a != "st"}
        if "st" in config["grid"]["adversary"]:
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
