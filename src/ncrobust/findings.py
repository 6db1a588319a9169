"""Findings: what a run shows, as Markdown generated from its result tables.

A *findings block* is a table and the conclusion sentences drawn from it, for one shipped config
(:data:`BLOCKS`: ``default`` for ``config/config.yaml``, ``imbalance``, ``related``, ``mnist1d`` and ``kernel``
for the configs of the same names). Every number in a block is read from the run's tables
(``results/tables/*.parquet``), and every comparison a sentence makes (larger, smaller, closer,
holds, does not hold) is computed from the numbers the sentence quotes: the text has no direction
typed in, so a block cannot claim what its run does not show. A sentence whose numbers are missing
from the tables (a grid without the cells it compares) is left out.

Documents hold blocks between two marker lines, ``<!-- findings:NAME:start -->`` and
``<!-- findings:NAME:end -->``. From a shell::

    python -m ncrobust.findings write --results results --config NAME        # results/findings/NAME.md
    python -m ncrobust.findings check DOC --results results --config NAME    # exit 1: one line per difference
    python -m ncrobust.findings update DOC --results results --config NAME   # rewrite DOC's block

Torch-free: it reads Parquet files with pandas.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ncrobust.cell import ADVERSARIES, BASE_VARIANT
from ncrobust.columns import PENULTIMATE

TABLES = ("summary", "metrics", "robustness", "mixup_geometry", "probe", "training", "kernel", "kernel_dynamics", "spectra")
"""The tables of ``results/tables`` a block may read (``summary`` and ``metrics`` are required)."""

BN_EVAL_VARIANT = "bn-eval"
"""The default config's variant of TRADES with Su et al.'s BatchNorm handling
(``training.trades_bn: eval``: the TRADES update runs BatchNorm in eval mode, so its running
statistics never move); ``base`` TRADES cells run it in train mode (``trades_bn: train``)."""

IMBALANCE_VARIANTS = {"r10": (10, True), "r100": (100, True), "r10-nobias": (10, False), "r100-nobias": (100, False)}
"""``config/imbalance.yaml``'s imbalanced variants: (ratio of the ``step`` profile, classifier bias)."""

RELATED_VARIANTS = ("mixup", "normalized")
"""``config/related.yaml``'s variants besides ``base``: mixup (alpha 1) and normalized features."""

PROBE_LAMBDA = 1.0
"""The proximity weight of the near-collapse probe that the related table quotes."""

MISSING = "–"


class FindingsError(ValueError):
    """A block cannot be made or found; the message is one line naming the file or table."""


# ---------------------------------------------------------------------------------------------
# the tables


@dataclass
class Tables:
    """A run's result tables (``results/tables/NAME.parquet``); the optional ones are ``None``
    when the run did not write them."""

    summary: pd.DataFrame
    metrics: pd.DataFrame
    robustness: pd.DataFrame | None = None
    mixup_geometry: pd.DataFrame | None = None
    probe: pd.DataFrame | None = None
    training: pd.DataFrame | None = None
    kernel: pd.DataFrame | None = None
    kernel_dynamics: pd.DataFrame | None = None
    spectra: pd.DataFrame | None = None

    @classmethod
    def read(cls, results: str | os.PathLike) -> Tables:
        folder = Path(results) / "tables"
        frames = {}
        for name in TABLES:
            path = folder / f"{name}.parquet"
            if path.exists():
                frames[name] = pd.read_parquet(path)
            elif name in ("summary", "metrics"):
                raise FindingsError(f"{path}: no such table; run the workflow first (snakemake --cores 2)")
        return cls(**frames)


class _Missing(Exception):
    """A number a sentence needs is not in the tables: the sentence is left out."""


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


class _Cells:
    """Mean-over-seeds values of a run's cells: the summary's quantities, the strong evaluation's
    accuracies and any penultimate metric at an epoch; ``get`` raises :class:`_Missing` for a value
    the tables do not hold."""

    def __init__(self, tables: Tables):
        self.summary = tables.summary
        self.metrics = tables.metrics
        robustness = tables.robustness
        self.robustness = None if robustness is None or robustness.empty else robustness

    def _rows(self, frame: pd.DataFrame, cell: dict) -> pd.DataFrame:
        mask = pd.Series(True, index=frame.index)
        for key, value in cell.items():
            mask &= frame[key] == value
        return frame[mask]

    def get(self, quantity: str, **cell) -> float:
        """``quantity`` of the summary (``nc1_clean``, ...: its ``_mean`` column) for ``cell``."""
        rows = self._rows(self.summary, cell)
        column = f"{quantity}_mean"
        if len(rows) != 1 or column not in rows.columns or not _present(rows[column].iloc[0]):
            raise _Missing(quantity)
        return float(rows[column].iloc[0])

    def has(self, **cell) -> bool:
        return len(self._rows(self.summary, cell)) == 1

    def attack(self, attack: str, **cell) -> float:
        """Robust accuracy under ``attack`` (``pgd``, ``worst``) of the strong evaluation, mean over seeds."""
        if self.robustness is None:
            raise _Missing(attack)
        rows = self._rows(self.robustness, cell)
        rows = rows[rows["attack"] == attack]
        if rows.empty:
            raise _Missing(attack)
        return float(rows["robust_accuracy"].mean())

    def strong_attacks(self) -> list[str]:
        """The strong attacks of the robustness table (not clean, PGD-10 or their worst case)."""
        if self.robustness is None:
            return []
        return [a for a in dict.fromkeys(self.robustness["attack"]) if a not in ("clean", "pgd", "worst")]

    def metric(self, metric: str, *, epoch: int | None = None, split: str = "train", **cell) -> float:
        """A scalar penultimate ``metric`` of the clean features of ``cell`` at ``epoch`` (default:
        the cell's last), mean over seeds (clean rows carry one threat model: the cell's own)."""
        m = self.metrics
        m = m[(m["metric"] == metric) & (m["layer"] == PENULTIMATE) & (m["split"] == split)
              & (m["perturbation"] == "clean") & m["class"].isna() & m["row"].isna()]
        m = self._rows(m, cell)
        if m.empty:
            raise _Missing(metric)
        m = m[m["epoch"] == (m["epoch"].max() if epoch is None else epoch)]
        if m.empty:
            raise _Missing(metric)
        return float(m.groupby("seed")["value"].first().mean())

    def smallest_class(self, **cell) -> int:
        """The fewest training samples of a class in ``cell`` (``train_class_count``)."""
        m = self._rows(self.metrics[self.metrics["metric"] == "train_class_count"], cell)
        if m.empty:
            raise _Missing("train_class_count")
        return int(m["value"].min())

    def epochs(self) -> list[int]:
        return sorted({int(e) for e in self.metrics["epoch"]})


# ---------------------------------------------------------------------------------------------
# numbers and comparisons in words


def nc(x: float) -> str:
    """NC1 and other ratios of spreads: three decimals below 1, else three significant digits
    (trailing zeros kept; at least the integer part)."""
    decimals = 3 if abs(x) < 1 else 2 if abs(x) < 10 else 1 if abs(x) < 100 else 0
    return f"{x:.{decimals}f}"


def acc(x: float) -> str:
    """Accuracies and rates: three decimals."""
    return f"{x:.3f}"


def deg(x: float) -> str:
    """Angles: one decimal."""
    return f"{x:.1f}°"


def deg0(x: float) -> str:
    """Angles to the degree."""
    return f"{x:.0f}°"


def two(x: float) -> str:
    """Cosines and ratios near 1: two decimals (no ``-0.00``)."""
    text = f"{x:.2f}"
    return "0.00" if text == "-0.00" else text


def compare(a: float, b: float, fmt: Callable[[float], str] = nc) -> int:
    """1 when ``a > b``, -1 when ``a < b``, 0 when the two print the same with ``fmt``: a
    sentence never states a direction its printed numbers do not show."""
    if fmt(a) == fmt(b):
        return 0
    return 1 if a > b else -1


def pick(a: float, b: float, more: str, less: str, same: str, fmt: Callable[[float], str] = nc) -> str:
    """``more`` when ``a > b``, ``less`` when ``a < b``, ``same`` when they print the same."""
    return {1: more, -1: less, 0: same}[compare(a, b, fmt)]


def times(a: float, b: float, larger: str = "larger", smaller: str = "smaller") -> str:
    """``a`` against ``b`` as a factor: ``"24 times larger"``, ``"1.6 times smaller"``, or
    ``"about equal"`` when the factor rounds to 1 at two significant digits."""
    if a <= 0 or b <= 0:
        return pick(a, b, larger, smaller, "equal")
    factor = a / b if a >= b else b / a
    if f"{factor:.2g}" == "1":
        return "about equal"
    return f"{factor:.2g} times {larger if a > b else smaller}"


def span(values: list[float], fmt: Callable[[float], str]) -> str:
    """``"0.21 to 0.26"`` (or one number when all print the same)."""
    low, high = fmt(min(values)), fmt(max(values))
    return low if low == high else f"{low} to {high}"


def _both(pair: tuple[str, str]) -> str:
    return f"{pair[0]} / {pair[1]}"


def _show(fmt: Callable[[float], str], value: Callable[..., float], *args, **kwargs) -> str:
    """``fmt(value(*args, **kwargs))`` for a table cell, or :data:`MISSING` when the tables lack it."""
    try:
        return fmt(value(*args, **kwargs))
    except _Missing:
        return MISSING


def _sentences(*builders: Callable[[], str]) -> list[str]:
    """The sentences whose numbers the tables hold."""
    out = []
    for build in builders:
        try:
            text = build()
        except _Missing:
            continue
        if text:
            out.append(text)
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _ordered(values, order=()) -> list:
    """Distinct ``values`` in ``order`` first, then sorted."""
    values = list(dict.fromkeys(values))
    known = [v for v in order if v in values]
    return known + sorted(v for v in values if v not in known)


def _seeds(summary: pd.DataFrame) -> str:
    seeds = sorted({int(s) for s in summary["seeds"]}) if "seeds" in summary.columns else []
    if not seeds:
        return "no seeds"
    return " or ".join(str(s) for s in seeds) + (" seed" if seeds == [1] else " seeds")


def _epoch(summary: pd.DataFrame) -> str:
    return "/".join(str(int(e)) for e in sorted(set(summary["epoch"])))


def _groups(summary: pd.DataFrame, keys=("dataset", "model", "loss")) -> list[dict]:
    """The (dataset, model, loss) settings of the run, in the summary's order."""
    return [dict(zip(keys, values)) for values in dict.fromkeys(zip(*(summary[k] for k in keys)))]


def _label(group: dict, varying: list[str]) -> str:
    return " / ".join(f"`{group[k]}`" for k in varying) if varying else ""


def _varying(summary: pd.DataFrame, keys=("dataset", "model")) -> list[str]:
    return [k for k in keys if summary[k].nunique() > 1]


# ---------------------------------------------------------------------------------------------
# the default block: Su et al.'s findings on the embedded default's grid


def default_block(tables: Tables) -> str:
    """The final-epoch geometry of each training adversary (and variant), and the sentences of
    Su et al.'s findings: standard training's collapse and its fragility under PGD, PGD-AT's
    robust collapse, and TRADES against PGD-AT with each BatchNorm handling in the run."""
    cells, summary = _Cells(tables), tables.summary
    varying = _varying(summary)
    strong = cells.strong_attacks()
    split = "test" if cells.robustness is None else "/".join(sorted(set(cells.robustness["split"])))
    robust = f"{split} robust accuracy (PGD-10" + (f" / worst of {', '.join(a.upper() if a.startswith('apgd') else a for a in strong)})" if strong else ")")
    header = [*varying, "loss", "adversary", "variant", "`nc1_clean`", "`nc1_pgd`", "`ncc_accuracy_clean_means_pgd`",
              "`leap_rate_pgd`", "`alignment_angle_pgd`", "`target_hit_rate`", robust]
    rows = []
    keys = [*varying, "loss", "adversary", "variant"]
    order = summary.assign(_a=summary["adversary"].map(ADVERSARIES.index), _v=summary["variant"] != BASE_VARIANT)
    for _, r in order.sort_values([*varying, "loss", "_a", "_v", "variant"]).iterrows():
        cell = {k: r[k] for k in ("dataset", "model", "loss", "adversary", "variant")}
        accuracy = [_show(acc, cells.attack, attack, **cell) for attack in ("pgd", *(["worst"] if strong else []))]
        rows.append([f"`{r[k]}`" if k in ("adversary", "variant") else str(r[k]) for k in keys] + [
            _show(nc, cells.get, "nc1_clean", **cell), _show(nc, cells.get, "nc1_pgd", **cell),
            _show(acc, cells.get, "ncc_accuracy_clean_means_pgd", **cell), _show(acc, cells.get, "leap_rate_pgd", **cell),
            _show(deg, cells.get, "alignment_angle_pgd", **cell), _show(acc, cells.get, "target_hit_rate", **cell),
            " / ".join(accuracy),
        ])
    lines = [
        (
            f"Final epoch ({_epoch(summary)}), mean over {_seeds(summary)}; the geometry on the train split, "
            f"PGD under each cell's own threat model; `target_hit_rate`: the share of the `pgd-targeted` set (target "
            f"`(y + 1) mod C`) that the network classifies as its target (`results/tables/summary.parquet`, `robustness.parquet`)."
        ),
        "",
        *_table(header, rows),
        "",
    ]
    bullets = []
    for group in _groups(summary):
        sentences = _default_sentences(cells, group)
        if sentences:
            bullets += [f"- With {_label(group, [*varying, 'loss'])}:"] + [f"  - {text}" for text in sentences]
    bullets += [f"- {text}" for text in _loss_sentences(cells, summary, varying)]
    bullets += [f"- {text}" for text in _attack_gap_sentences(cells, summary, varying)]
    return "\n".join(lines + bullets) + "\n"


def _default_sentences(cells: _Cells, g: dict) -> list[str]:
    st, pgd = dict(g, adversary="st", variant=BASE_VARIANT), dict(g, adversary="pgd-linf", variant=BASE_VARIANT)

    def standard():
        clean, perturbed = cells.get("nc1_clean", **st), cells.get("nc1_pgd", **st)
        leap = cells.get("leap_rate_pgd", **st)
        text = "`st`: "
        epochs = cells.epochs()
        final = max(epochs)
        if 0 in epochs and final > 0:
            start = cells.metric("nc1", epoch=0, **st)
            text += (f"the clean features {pick(clean, start, 'do not collapse', 'collapse', 'keep their spread')} during training "
                     f"(`nc1` {nc(start)} at epoch 0, {nc(clean)} at epoch {final}); ")
        else:
            text += f"clean `nc1` {nc(clean)}; "
        text += (f"PGD {pick(perturbed, clean, 'spreads the classes out again', 'tightens them further', 'leaves their spread')} "
                 f"(`nc1_pgd` {nc(perturbed)}, {times(perturbed, clean)} than clean), and "
                 f"{100 * leap:.0f}% of the PGD features leap to another class's clean vertex (`leap_rate_pgd` {acc(leap)}).")
        return text

    def adversarial():
        p_pgd, s_pgd = cells.get("nc1_pgd", **pgd), cells.get("nc1_pgd", **st)
        p_angle, s_angle = cells.get("alignment_angle_pgd", **pgd), cells.get("alignment_angle_pgd", **st)
        p_ncc, s_ncc = cells.get("ncc_accuracy_clean_means_pgd", **pgd), cells.get("ncc_accuracy_clean_means_pgd", **st)
        return (
            f"`pgd-linf`: its PGD features are {pick(p_pgd, s_pgd, 'less', 'more', 'as')} collapsed than `st`'s "
            f"(`nc1_pgd` {nc(p_pgd)} against {nc(s_pgd)}, {times(p_pgd, s_pgd)}), their class means lie "
            f"{pick(p_angle, s_angle, 'further from', 'closer to', 'as close to', deg)} the clean ones "
            f"({deg(p_angle)} against {deg(s_angle)}), and the nearest-class-centre classifier built on the clean means "
            f"labels {pick(p_ncc, s_ncc, 'more', 'fewer', 'as many', acc)} of them correctly "
            f"({acc(p_ncc)} against {acc(s_ncc)})."
        )

    def targeted():
        s_hit, p_hit = cells.get("target_hit_rate", **st), cells.get("target_hit_rate", **pgd)
        reached = "reaches" if compare(s_hit, 0.5, acc) >= 0 else "does not reach"
        return (
            f"`pgd-targeted` {reached} its target for at least half of `st`'s training samples (`target_hit_rate` "
            f"{acc(s_hit)}); `pgd-linf` is steered to the target {pick(p_hit, s_hit, 'more', 'less', 'as', acc)} often "
            f"({acc(p_hit)}, {times(p_hit, s_hit, 'more', 'less')})."
        )

    def trades(variant: str):
        def sentence():
            cell = dict(g, adversary="trades-linf", variant=variant)
            t_clean, t_pgd = cells.get("nc1_clean", **cell), cells.get("nc1_pgd", **cell)
            p_clean, p_pgd = cells.get("nc1_clean", **pgd), cells.get("nc1_pgd", **pgd)
            how = ("BatchNorm in train mode in the TRADES update (`base`, `training.trades_bn: train`)" if variant == BASE_VARIANT
                   else f"Su et al.'s BatchNorm handling (`{variant}`, `training.trades_bn: eval`: BatchNorm's statistics never move)"
                   if variant == BN_EVAL_VARIANT else f"variant `{variant}`")
            return (
                f"`trades-linf` with {how}: `nc1` {nc(t_clean)} clean and {nc(t_pgd)} under PGD, against `pgd-linf`'s "
                f"{nc(p_clean)} and {nc(p_pgd)} ({times(t_clean, p_clean)}; {times(t_pgd, p_pgd)}): "
                f"{_trades_verdict(t_clean, t_pgd, p_clean, p_pgd)}."
            )
        return sentence

    def verdict():
        handlings = [v for v in (BASE_VARIANT, BN_EVAL_VARIANT) if cells.has(**dict(g, adversary="trades-linf", variant=v))]
        if len(handlings) < 2:
            return ""
        p_clean, p_pgd = cells.get("nc1_clean", **pgd), cells.get("nc1_pgd", **pgd)
        holds = {}
        for v in handlings:
            cell = dict(g, adversary="trades-linf", variant=v)
            holds[v] = compare(cells.get("nc1_clean", **cell), p_clean) > 0 and compare(cells.get("nc1_pgd", **cell), p_pgd) > 0
        words = {True: "holds", False: "does not hold"}
        text = (f"Su et al.'s \"TRADES collapses less than PGD-AT\" {words[holds[BASE_VARIANT]]} with BatchNorm in train mode "
                f"and {words[holds[BN_EVAL_VARIANT]]} with their eval-mode BatchNorm (`{BN_EVAL_VARIANT}`)")
        if holds[BN_EVAL_VARIANT] and not holds[BASE_VARIANT]:
            text += ": here it follows from that BatchNorm handling"
        return text + "."

    variants = [v for v in (BASE_VARIANT, BN_EVAL_VARIANT) if cells.has(**dict(g, adversary="trades-linf", variant=v))]
    return _sentences(standard, adversarial, targeted, *(trades(v) for v in variants), verdict)


def _trades_verdict(t_clean: float, t_pgd: float, p_clean: float, p_pgd: float) -> str:
    clean, perturbed = compare(t_clean, p_clean), compare(t_pgd, p_pgd)
    if clean > 0 and perturbed > 0:
        return "TRADES collapses less than PGD-AT, clean and under PGD"
    if clean < 0 and perturbed < 0:
        return "TRADES collapses more than PGD-AT, clean and under PGD"
    word = {1: "less", -1: "more", 0: "as much"}
    return f"TRADES collapses {word[clean]} than PGD-AT on clean features and {word[perturbed]} under PGD".replace("as much than", "as much as")


def _loss_sentences(cells: _Cells, summary: pd.DataFrame, varying: list[str]) -> list[str]:
    """Each further loss against the first of its (dataset, model): clean and PGD collapse per adversary."""
    out = []
    for setting in _groups(summary, ("dataset", "model")):
        losses = _ordered(summary[(summary["dataset"] == setting["dataset"]) & (summary["model"] == setting["model"])]["loss"])
        first = losses[0] if losses else None
        for loss in losses[1:]:
            for quantity, what in (("nc1_clean", "clean features"), ("nc1_pgd", "PGD features")):
                def sentence(loss=loss, quantity=quantity, what=what, setting=setting, first=first):
                    parts, directions = [], set()
                    for adversary in _ordered(summary["adversary"], ADVERSARIES):
                        cell = dict(setting, adversary=adversary, variant=BASE_VARIANT)
                        try:
                            a, b = cells.get(quantity, loss=loss, **cell), cells.get(quantity, loss=first, **cell)
                        except _Missing:
                            continue
                        directions.add(compare(a, b))
                        parts.append(f"{nc(a)} against {nc(b)} for `{adversary}`")
                    if not parts:
                        raise _Missing(quantity)
                    word = {1: "less", -1: "more", 0: "as much"}
                    overall = (f"collapse {word[directions.pop()]} than with `{first}` for every adversary"
                               if len(directions) == 1 else f"do not collapse uniformly more or less than with `{first}`")
                    overall = overall.replace("as much than", "as much as")
                    prefix = _label(setting, varying)
                    return f"{prefix + ', ' if prefix else ''}`{loss}`: the {what} {overall} (`{quantity}` {', '.join(parts)})."
                out += _sentences(sentence)
    return out


def _attack_gap_sentences(cells: _Cells, summary: pd.DataFrame, varying: list[str]) -> list[str]:
    """Per (dataset, model, loss): how far PGD-10 (the evaluation's attack, with the cell's attack
    loss) stays above the worst case of the strong evaluation, per adversary, against the first loss."""
    out = []
    for setting in _groups(summary, ("dataset", "model")):
        losses = _ordered(summary[(summary["dataset"] == setting["dataset"]) & (summary["model"] == setting["model"])]["loss"])
        for loss in losses[1:]:
            def sentence(loss=loss, setting=setting, first=losses[0]):
                parts, wider = [], []
                for adversary in _ordered(summary["adversary"], ADVERSARIES):
                    cell = dict(setting, adversary=adversary, variant=BASE_VARIANT)
                    try:
                        pgd, worst = cells.attack("pgd", loss=loss, **cell), cells.attack("worst", loss=loss, **cell)
                        pgd0, worst0 = cells.attack("pgd", loss=first, **cell), cells.attack("worst", loss=first, **cell)
                    except _Missing:
                        continue
                    parts.append(f"`{adversary}` {acc(pgd)} / {acc(worst)} against {acc(pgd0)} / {acc(worst0)}")
                    wider.append(compare(pgd - worst, pgd0 - worst0, acc))
                if not parts:
                    raise _Missing("robustness")
                head = f"{_label(setting, varying) + ', ' if _label(setting, varying) else ''}`{loss}`: "
                numbers = f"(test robust accuracy PGD-10 / worst: {', '.join(parts)})"
                if set(wider) == {1}:
                    return (head + f"PGD-10 with the cells' attack loss (`evaluation.attack_loss`) stays further above the "
                            f"worst case than with `{first}` {numbers}, so their PGD geometry is measured on points that a "
                            f"stronger attack moves further.")
                word = "closer to" if set(wider) == {-1} else "not uniformly further from or closer to"
                return head + f"PGD-10 stays {word} the worst case than with `{first}` {numbers}."

            out += _sentences(sentence)
    return out


# ---------------------------------------------------------------------------------------------
# the imbalance block: Minority Collapse with and without adversarial training


def imbalance_block(tables: Tables) -> str:
    """Minority Collapse of the classifier rows and class means at imbalance ratios 10 and 100,
    with and without the classifier's bias, for each loss and training adversary."""
    cells, summary = _Cells(tables), tables.summary
    base = {k: summary[k].iloc[0] for k in ("dataset", "model")} if len(summary) else {}
    header = ["loss, adversary", "`minority_cos_W` ratio 10 / 100", "same, no bias", "`minority_cos_M` clean / PGD, ratio 100",
              "test accuracy of the minorities, ratio 10: clean / PGD"]
    rows = []
    for loss in _ordered(summary["loss"]):
        for adversary in _ordered(summary[summary["loss"] == loss]["adversary"], ADVERSARIES):
            cell = dict(base, loss=loss, adversary=adversary)

            pairs = ((("minority_cos_W", "r10"), ("minority_cos_W", "r100")),
                     (("minority_cos_W", "r10-nobias"), ("minority_cos_W", "r100-nobias")),
                     (("minority_cos_M_clean", "r100"), ("minority_cos_M_pgd", "r100")),
                     (("test_minority_accuracy", "r10"), ("test_minority_robust_accuracy", "r10")))
            rows.append([f"{loss}, `{adversary}`"] + [
                _both(tuple(_show(two, cells.get, quantity, variant=variant, **cell) for quantity, variant in pair)) for pair in pairs
            ])
    lines = [
        (
            f"Final epoch ({_epoch(summary)}), {_seeds(summary)}, train split for the cosines (`minority_cos_W`: mean cosine "
            "between the minority classes' classifier rows, 1 = Minority Collapse; `minority_cos_M`: the same for their "
            "centred class means), test split for the accuracies (`results/tables/summary.parquet`)."
        ),
        "",
        *_table(header, rows),
        "",
    ]
    bullets = _imbalance_sentences(cells, summary, base)
    return "\n".join(lines + [f"- {b}" for b in bullets]) + "\n"


def _reference_loss(summary: pd.DataFrame) -> tuple[str | None, list[str]]:
    """The loss the sentences compare against (``ce`` when the run has it) and the others."""
    losses = _ordered(summary["loss"])
    ce = "ce" if "ce" in losses else (losses[0] if losses else None)
    return ce, [loss for loss in losses if loss != ce]


def _imbalance_sentences(cells: _Cells, summary: pd.DataFrame, base: dict) -> list[str]:
    ce, others = _reference_loss(summary)

    def c(quantity, adversary, variant, loss=ce):
        return cells.get(quantity, loss=loss, adversary=adversary, variant=variant, **base)

    def growth():
        parts = []
        for adversary in ("st", "pgd-linf"):
            r10, r100 = c("minority_cos_W", adversary, "r10"), c("minority_cos_W", adversary, "r100")
            parts.append(f"{pick(r100, r10, 'rises', 'falls', 'stays', two)} from {two(r10)} to {two(r100)} for `{adversary}`")
        means, minority, overall = c("minority_cos_M_clean", "st", "r100"), c("test_minority_accuracy", "st", "r100"), c("test_accuracy", "st", "r100")
        try:
            fewest = cells.smallest_class(loss=ce, adversary="st", variant="r100", **base)
            images = f" ({fewest} training image{'' if fewest == 1 else 's'} per minority class)"
        except _Missing:
            images = ""
        return (f"**Minority Collapse with `{ce}`.** From ratio 10 to ratio 100 the minority classifier rows' mean cosine "
                f"{' and '.join(parts)}. At ratio 100{images} the minority clean class means "
                f"of `st` have a mean cosine of {two(means)}, and its test accuracy on the minority classes is {two(minority)} "
                f"(on all classes {two(overall)}).")

    def adversarial():
        rows = {b: (c("minority_cos_W", "pgd-linf", v), c("minority_cos_W", "st", v)) for b, v in (("bias", "r100"), ("nobias", "r100-nobias"))}
        means = (c("minority_cos_M_clean", "pgd-linf", "r100"), c("minority_cos_M_clean", "st", "r100"))
        pgd = (c("minority_cos_M_pgd", "pgd-linf", "r100"), c("minority_cos_M_pgd", "st", "r100"))
        directions = {compare(a, b, two) for a, b in (*rows.values(), means)}
        verdict = ("Adversarial training weakens it" if directions == {-1} else "Adversarial training strengthens it"
                   if directions == {1} else "Adversarial training does not weaken it throughout")
        return (f"**{verdict}** (ratio 100, `{ce}`): `pgd-linf`'s minority rows have a mean cosine of {two(rows['bias'][0])} "
                f"against {two(rows['bias'][1])} for `st` ({two(rows['nobias'][0])} against {two(rows['nobias'][1])} without "
                f"bias), its clean minority means {two(means[0])} against {two(means[1])}. Under PGD the minority means are at "
                f"{two(pgd[0])} for `pgd-linf` and {two(pgd[1])} for `st`: the adversarially trained ones stay "
                f"{pick(pgd[0], pgd[1], 'more', 'less', 'as', two)} collapsed.")

    def other_loss(loss):
        def sentence():
            values = [c("minority_cos_W", adversary, v, loss) for adversary in ("st", "pgd-linf") for v in IMBALANCE_VARIANTS]
            reference = [c("minority_cos_W", adversary, v) for adversary in ("st", "pgd-linf") for v in IMBALANCE_VARIANTS]
            ortho = [cells.metric("orthogonality_W", loss=loss, adversary=adversary, variant=v, **base)
                     for adversary in ("st", "pgd-linf") for v in IMBALANCE_VARIANTS]
            return (f"**With `{loss}`** the minority rows' mean cosine is {span(values, two)} over both ratios, both "
                    f"adversaries and both bias settings ({span(reference, two)} with `{ce}`); the rows' `orthogonality_W` "
                    f"(0 for an orthogonal frame) is {span(ortho, two)}.")
        return sentence

    def bias():
        parts = []
        for adversary in ("st", "pgd-linf"):
            with_bias, without = c("minority_cos_W", adversary, "r100"), c("minority_cos_W", adversary, "r100-nobias")
            same = compare(without, with_bias, two) == 0
            parts.append(f"{pick(without, with_bias, 'raises', 'lowers', 'keeps', two)} it "
                         f"{'at' if same else 'from'} {two(with_bias)}{'' if same else f' to {two(without)}'} for `{adversary}`")
        means = [(c(q, "pgd-linf", "r100"), c(q, "pgd-linf", "r100-nobias")) for q in ("minority_cos_M_clean", "minority_cos_M_pgd")]
        seeds = int(summary["seeds"].max())
        parts[0] = parts[0].replace(" it ", " the minority rows' mean cosine ", 1)
        return (f"**Without the classifier's bias** (ratio 100, `{ce}`): dropping the bias "
                f"{' and '.join(parts)}; for `pgd-linf` the minority means go from {two(means[0][0])} to {two(means[0][1])} "
                f"(clean) and from {two(means[1][0])} to {two(means[1][1])} (PGD)"
                + (" (one seed: a hint, not a finding)." if seeds == 1 else f" (mean of {seeds} seeds)."))

    def robustness():
        pgd, st = c("test_minority_robust_accuracy", "pgd-linf", "r10"), c("test_minority_robust_accuracy", "st", "r10")
        pgd_clean, st_clean = c("test_minority_accuracy", "pgd-linf", "r10"), c("test_minority_accuracy", "st", "r10")
        return (f"At ratio 10 (`{ce}`) PGD-AT keeps {pick(pgd, st, 'more', 'less', 'as much', two)} of the minorities' "
                f"robustness: their PGD test accuracy is {two(pgd)} against {two(st)} for standard training (clean: "
                f"{two(pgd_clean)} against {two(st_clean)}).")

    return _sentences(growth, adversarial, *(other_loss(loss) for loss in others), bias, robustness)


# ---------------------------------------------------------------------------------------------
# the related block: mixup, normalized features, the near-collapse probe


def _mixup_angles(tables: Tables) -> dict:
    """(loss, adversary, variant, perturbation, metric) -> degrees at the final epoch, mean over
    seeds and over every class pair (the ``all`` rows)."""
    frame = tables.mixup_geometry
    if frame is None or frame.empty:
        return {}
    frame = frame[frame["epoch"] == frame.groupby(["loss", "adversary", "variant", "seed"])["epoch"].transform("max")]
    frame = frame[frame["pair"] == "all"] if "pair" in frame.columns else frame
    means = frame.groupby(["loss", "adversary", "variant", "perturbation", "metric"])["value"].mean()
    return {key: float(v) for key, v in means.items()}


def _probe_ratios(tables: Tables) -> pd.DataFrame:
    """``loss, adversary, variant, perturbation, lam, nc1_ratio`` at the final epoch, mean over seeds."""
    frame = tables.probe
    if frame is None or frame.empty:
        return pd.DataFrame(columns=["loss", "adversary", "variant", "perturbation", "lam", "nc1_ratio"])
    frame = frame[frame["epoch"] == frame.groupby(["loss", "adversary", "variant", "seed"])["epoch"].transform("max")]
    return frame.groupby(["loss", "adversary", "variant", "perturbation", "lam"])["nc1_ratio"].mean().reset_index()


def related_block(tables: Tables) -> str:
    """Mixup and normalized features next to the base recipe: accuracy, collapse, Fisher et al.'s
    mixup geometry and Tirer et al.'s near-collapse probe, per loss and training adversary."""
    cells, summary = _Cells(tables), tables.summary
    angles, probe = _mixup_angles(tables), _probe_ratios(tables)
    base = {k: summary[k].iloc[0] for k in ("dataset", "model")} if len(summary) else {}

    def angle(loss, adversary, variant, metric, perturbation):
        key = (loss, adversary, variant, perturbation, metric)
        if key not in angles:
            raise _Missing(metric)
        return angles[key]

    def ratio(loss, adversary, variant, perturbation, lam=PROBE_LAMBDA):
        rows = probe[(probe["loss"] == loss) & (probe["adversary"] == adversary) & (probe["variant"] == variant)
                     & (probe["perturbation"] == perturbation) & (probe["lam"] == lam)]
        if rows.empty:
            raise _Missing("probe")
        return float(rows["nc1_ratio"].iloc[0])

    header = ["loss", "adversary", "variant", "test acc.", "PGD-10 test acc.", "`nc1` clean", "`nc1` PGD",
              "same-class angle", "cross-boundary angle", f"probe ratio (lambda = {PROBE_LAMBDA:g})"]
    rows = []
    variant_order = (BASE_VARIANT, *RELATED_VARIANTS)
    for loss in _ordered(summary["loss"]):
        for adversary in _ordered(summary[summary["loss"] == loss]["adversary"], ADVERSARIES):
            for variant in _ordered(summary[(summary["loss"] == loss) & (summary["adversary"] == adversary)]["variant"], variant_order):
                cell = dict(base, loss=loss, adversary=adversary, variant=variant)
                rows.append([
                    loss, adversary, variant,
                    _show(acc, cells.get, "test_accuracy", **cell), _show(acc, cells.get, "test_robust_accuracy", **cell),
                    _show(nc, cells.get, "nc1_clean", **cell), _show(nc, cells.get, "nc1_pgd", **cell),
                    *(_both(tuple(_show(deg0, angle, loss, adversary, variant, m, p) for p in ("clean", "pgd")))
                      for m in ("same_class_angle", "cross_boundary_angle")),
                    _both(tuple(_show(two, ratio, loss, adversary, variant, p) for p in ("clean", "pgd"))),
                ])
    lines = [
        (
            f"Final epoch ({_epoch(summary)}), {_seeds(summary)}; the geometry on the train split (angles: clean / PGD mixes; "
            f"probe: `nc1_ratio` at lambda = {PROBE_LAMBDA:g}, clean / PGD features), the accuracies on the test split "
            "(`results/tables/summary.parquet`, `mixup_geometry.parquet`, `probe.parquet`)."
        ),
        "",
        *_table(header, rows),
        "",
    ]
    bullets = _related_sentences(cells, summary, base, angle, ratio, probe)
    return "\n".join(lines + [f"- {b}" for b in bullets]) + "\n"


def _related_sentences(cells: _Cells, summary: pd.DataFrame, base: dict, angle, ratio, probe: pd.DataFrame) -> list[str]:
    ce, others = _reference_loss(summary)

    def g(quantity, adversary, variant, loss=ce):
        return cells.get(quantity, loss=loss, adversary=adversary, variant=variant, **base)

    def mixup():
        cross = {a: (angle(ce, a, "mixup", "cross_boundary_angle", "clean"), angle(ce, a, BASE_VARIANT, "cross_boundary_angle", "clean"))
                 for a in ("st", "pgd-linf")}
        attacked = {a: angle(ce, a, "mixup", "cross_boundary_angle", "pgd") for a in ("st", "pgd-linf")}
        same = (angle(ce, "st", "mixup", "same_class_angle", "clean"), angle(ce, "st", BASE_VARIANT, "same_class_angle", "clean"))
        collapse = (g("nc1_clean", "st", "mixup"), g("nc1_clean", "st", BASE_VARIANT))
        robust = {a: (g("test_robust_accuracy", a, "mixup"), g("test_robust_accuracy", a, BASE_VARIANT)) for a in ("st", "pgd-linf")}
        toward = {compare(m, b, deg0) for m, b in cross.values()}
        channel = ("move towards" if toward == {-1} else "move away from" if toward == {1} else "do not move uniformly towards")
        cost = {compare(m, b, acc) for m, b in robust.values()}
        effect = ("Mixup costs robustness here" if cost == {-1} else "Mixup adds robustness here" if cost == {1}
                  else "Mixup does not change robustness uniformly here")
        return (
            f"**Mixup** (`{ce}`): cross-class mixes {channel} the boundary between their two classes' rows "
            f"({deg0(cross['st'][0])} from it for `st` and {deg0(cross['pgd-linf'][0])} for `pgd-linf`, against "
            f"{deg0(cross['st'][1])} and {deg0(cross['pgd-linf'][1])} without mixup). Under PGD these mixes lie at "
            f"{deg0(attacked['st'])} for `st` and {deg0(attacked['pgd-linf'])} for `pgd-linf`. Same-class mixes are "
            f"{pick(same[0], same[1], 'further from', 'closer to', 'as far from', deg0)} their row with mixup "
            f"({deg0(same[0])} against {deg0(same[1])} for `st`), and the clean features collapse "
            f"{pick(collapse[0], collapse[1], 'less', 'more', 'as much')} (`nc1` {nc(collapse[0])} against {nc(collapse[1])}). "
            f"{effect}: PGD-10 test accuracy {acc(robust['st'][0])} against {acc(robust['st'][1])} for `st`, "
            f"{acc(robust['pgd-linf'][0])} against {acc(robust['pgd-linf'][1])} for `pgd-linf`."
        )

    def mixup_other(loss):
        def sentence():
            parts = []
            for a in ("st", "pgd-linf"):
                m, b = angle(loss, a, "mixup", "cross_boundary_angle", "clean"), angle(loss, a, BASE_VARIANT, "cross_boundary_angle", "clean")
                parts.append(f"{deg0(m)} against {deg0(b)} for `{a}`")
            return f"With `{loss}` the cross-class mixes lie at {' and '.join(parts)} from the boundary (mixup against none)."
        return sentence

    def normalized():
        collapse = (g("nc1_clean", "st", "normalized"), g("nc1_clean", "st", BASE_VARIANT))
        same = (angle(ce, "st", "normalized", "same_class_angle", "clean"), angle(ce, "st", BASE_VARIANT, "same_class_angle", "clean"))
        nc3 = (g("nc3_clean", "st", "normalized"), g("nc3_clean", "st", BASE_VARIANT))
        attacked = (g("nc1_pgd", "st", "normalized"), g("nc1_pgd", "st", BASE_VARIANT))
        robust = {a: (g("test_robust_accuracy", a, "normalized"), g("test_robust_accuracy", a, BASE_VARIANT)) for a in ("st", "pgd-linf")}
        return (
            f"**Normalized features** (`{ce}`): the clean features of `st` collapse "
            f"{pick(collapse[0], collapse[1], 'less', 'further', 'as far')} (`nc1` {nc(collapse[0])} against {nc(collapse[1])}, "
            f"same-class mixes {deg0(same[0])} against {deg0(same[1])} from their row, `nc3` {two(nc3[0])} against {two(nc3[1])}); "
            f"under PGD `nc1` is {nc(attacked[0])} against {nc(attacked[1])}, and PGD-10 test accuracy {acc(robust['st'][0])} "
            f"against {acc(robust['st'][1])} ({acc(robust['pgd-linf'][0])} against {acc(robust['pgd-linf'][1])} for `pgd-linf`)."
        )

    def normalized_other(loss):
        def sentence():
            robust = (g("test_robust_accuracy", "st", "normalized", loss), g("test_robust_accuracy", "st", BASE_VARIANT, loss))
            attacked = (g("nc1_pgd", "st", "normalized", loss), g("nc1_pgd", "st", BASE_VARIANT, loss))
            return (f"With `{loss}` normalized features make `st` {pick(robust[0], robust[1], 'more', 'less', 'as', acc)} robust "
                    f"(PGD-10 test accuracy {acc(robust[0])} against {acc(robust[1])}), with PGD features that collapse "
                    f"{pick(attacked[0], attacked[1], 'less', 'more', 'as much')} (`nc1` {nc(attacked[0])} against {nc(attacked[1])}).")
        return sentence

    def near_collapse():
        if probe.empty or not (probe["lam"] == PROBE_LAMBDA).any():
            raise _Missing("probe")
        at = probe[probe["lam"] == PROBE_LAMBDA]
        clean = at[at["perturbation"] == "clean"]["nc1_ratio"].tolist()
        parts = []
        for loss in (ce, *others):
            for a in ("st", "pgd-linf"):
                try:
                    parts.append(f"{two(ratio(loss, a, BASE_VARIANT, 'pgd'))} for `{a}` with `{loss}`")
                except _Missing:
                    pass
        low, high = probe["lam"].min(), probe["lam"].max()
        return (
            f"**Near-collapse probe**: one more regularised layer at lambda = {PROBE_LAMBDA:g} would bring NC1 of the clean "
            f"features to {span(clean, two)} of its value across the cells; for the PGD features of the base networks the "
            f"ratio is {', '.join(parts)}. At lambda = {high:g} the ratio is {span(probe[probe['lam'] == high]['nc1_ratio'].tolist(), two)}, "
            f"at lambda = {low:g} at most {probe[probe['lam'] == low]['nc1_ratio'].max():.3f}."
        )

    return _sentences(mixup, *(mixup_other(loss) for loss in others), normalized,
                      *(normalized_other(loss) for loss in others), near_collapse)


# ---------------------------------------------------------------------------------------------
# the mnist1d block: the published accuracies, then Su et al.'s findings on MNIST-1D

PUBLISHED_ACCURACY = {"mlp": 0.68, "cnn1d": 0.94}
"""Greydanus & Kobak (ICML 2024), MNIST-1D test accuracy of the MLP and the CNN (their table of
baselines: logistic regression 0.32, GRU 0.91, human 0.96)."""

PUBLISHED_TOLERANCE = 0.05
"""How far (in accuracy) the standard-trained networks' mean clean test accuracy may lie from the
published one: our recipe differs (SGD with momentum, weight decay and a step schedule instead of
Adam; BatchNorm; a plain MLP of the same size instead of one with a residual layer)."""


def mnist1d_block(tables: Tables) -> str:
    """The external check (the clean test accuracy of standard training against the MNIST-1D
    paper's), the terminal phase of standard training (train accuracy, NC1 half-way and final),
    Su et al.'s findings as in the default block, and the layerwise NC1 of ``st`` and ``pgd-linf``."""
    cells, summary = _Cells(tables), tables.summary
    reference = _reference_loss(summary)[0]
    rows = []
    for model in _ordered(summary["model"], tuple(PUBLISHED_ACCURACY)):
        cell = dict(model=model, loss=reference, adversary="st", variant=BASE_VARIANT)
        published = PUBLISHED_ACCURACY.get(model)
        try:
            ours = cells.get("test_accuracy", **cell)
        except _Missing:
            ours = None
        if published is None or ours is None:
            rows.append([f"`{model}`", MISSING if published is None else acc(published),
                         MISSING if ours is None else acc(ours), MISSING, MISSING])
            continue
        within = compare(abs(ours - published), PUBLISHED_TOLERANCE, acc) <= 0
        rows.append([f"`{model}`", acc(published), acc(ours), f"{ours - published:+.3f}", "yes" if within else "no"])
    lines = [
        (
            f"**External check.** Clean test accuracy of `st` with `{reference}` at the final epoch ({_epoch(summary)}), "
            f"mean over {_seeds(summary)}, against Greydanus & Kobak's published MNIST-1D accuracy "
            f"(tolerance {PUBLISHED_TOLERANCE:.2f}; `results/tables/summary.parquet`)."
        ),
        "",
        *_table(["model", "published", "ours", "difference", f"within {PUBLISHED_TOLERANCE:.2f}"], rows),
        "",
    ]
    terminal = [f"- {text}" for text in _terminal_sentences(cells, summary, tables.training)]
    layerwise = [f"- {text}" for text in _layerwise_sentences(cells, summary, tables.metrics)]
    return "\n".join(lines + terminal + [""]) + "\n" + default_block(tables) + ("\n".join(layerwise) + "\n" if layerwise else "")


def _terminal_sentences(cells: _Cells, summary: pd.DataFrame, training: pd.DataFrame | None) -> list[str]:
    """Per model and loss: `st`'s train accuracy at the final epoch (eval mode) and the training
    log's in-step clean NC1 (``training.track_collapse``) half-way and at the end, mean over seeds:
    whether the run is in the terminal phase."""
    if training is None or training.empty or "nc1_clean" not in training.columns or training["nc1_clean"].isna().all():
        return []
    out = []
    for group in _groups(summary):
        def sentence(group=group):
            st = dict(group, adversary="st", variant=BASE_VARIANT)
            train = cells.get("train_accuracy", **st)
            log = cells._rows(training, st)
            if log.empty:
                raise _Missing("training")
            final = int(log["epoch"].max())
            half = final // 2
            before = float(log[log["epoch"] == half]["nc1_clean"].mean())
            after = float(log[log["epoch"] == final]["nc1_clean"].mean())
            if not (_present(before) and _present(after)):
                raise _Missing("nc1_clean")
            return (f"Terminal phase, `{group['model']}` / `{group['loss']}` `st`: train accuracy {acc(train)} at epoch {final}; "
                    f"the training features' `nc1` (in-step, training log) {pick(after, before, 'rises', 'is still falling', 'is flat')}: "
                    f"{nc(before)} at epoch {half}, {nc(after)} at epoch {final}.")
        out += _sentences(sentence)
    return out


def _layerwise_sentences(cells: _Cells, summary: pd.DataFrame, metrics: pd.DataFrame) -> list[str]:
    """Per model (the reference loss): NC1 of the clean and the PGD train features at every tap,
    final epoch, for `st` and `pgd-linf`, and how the PGD / clean ratio changes from the first
    tap to the penultimate layer."""
    reference = _reference_loss(summary)[0]
    m = metrics[(metrics["metric"] == "nc1") & (metrics["split"] == "train") & metrics["class"].isna() & metrics["row"].isna()]
    out = []
    for model in _ordered(summary["model"], tuple(PUBLISHED_ACCURACY)):
        def sentence(model=model):
            parts = []
            for adversary in ("st", "pgd-linf"):
                rows = m[(m["model"] == model) & (m["loss"] == reference) & (m["adversary"] == adversary)
                         & (m["variant"] == BASE_VARIANT)]
                rows = rows[rows["epoch"] == rows["epoch"].max()] if not rows.empty else rows
                if rows.empty:
                    raise _Missing("nc1")
                layers = list(dict.fromkeys(rows["layer"]))
                layers = [layer for layer in layers if layer != PENULTIMATE] + [PENULTIMATE]
                value = {(p, layer): float(rows[(rows["perturbation"] == p) & (rows["layer"] == layer)].groupby("seed")["value"].first().mean())
                         for p in ("clean", "pgd") for layer in layers}
                if any(math.isnan(v) for v in value.values()):
                    raise _Missing("nc1")
                if len(layers) < 2:
                    raise _Missing("layerwise nc1")
                first, last = layers[0], layers[-1]
                ratio_first, ratio_last = value[("pgd", first)] / value[("clean", first)], value[("pgd", last)] / value[("clean", last)]
                steps = ", ".join(f"`{layer}` {nc(value[('clean', layer)])} / {nc(value[('pgd', layer)])}" for layer in layers)
                parts.append(f"`{adversary}`: {steps}; PGD's `nc1` is {two(ratio_first)} times the clean one at `{first}` and "
                             f"{two(ratio_last)} times at `{last}` (the gap {pick(ratio_last, ratio_first, 'widens', 'narrows', 'stays', two)} "
                             f"through the network)")
            return f"Layerwise `nc1` of `{model}` (`{reference}`, train split, clean / PGD): " + "; ".join(parts) + "."
        out += _sentences(sentence)
    return out


# ---------------------------------------------------------------------------------------------
# the kernel block: the kernel and spectrum views of config/kernel.yaml

SETTLE_FRACTION = 0.1
"""The kernel block compares the kernels at the first checkpoint at or after this fraction of
training: how far each still is from its final form (Tsilivis & Kempe's "lazy regime" question)."""

LOW_RANKS, HIGH_RANK = (2, 3, 5), 50
"""Eigen-features of ranks ``LOW_RANKS`` (their mean) against those of rank ``HIGH_RANK`` and above.
Rank 1 is left out: the top eigenvector of a trace kernel is close to the constant vector (all
entries of a network's kernel share its scale), and on balanced classes ``v_1^T Y`` is the same for
every class, so that feature predicts no label (its accuracy is chance in every run)."""


def sig(x: float) -> str:
    """Small positive quantities spanning decades (kernel velocities): two significant digits."""
    return f"{x:.2g}"


def _seed_mean(frame: pd.DataFrame, what: str) -> float:
    """The mean over seeds of one value per seed; :class:`_Missing` when there is none."""
    if frame.empty:
        raise _Missing(what)
    value = float(frame.groupby("seed")["value"].mean().mean())
    if not _present(value):
        raise _Missing(what)
    return value


def _kernel_views(tables: Tables, group: dict):
    """``(dynamics, kernel, spectra)`` rows of one setting (clean kernel set), or raise :class:`_Missing`."""
    frames = []
    for frame in (tables.kernel_dynamics, tables.kernel, tables.spectra):
        if frame is None or frame.empty:
            frames.append(pd.DataFrame(columns=["metric"]))
            continue
        mask = pd.Series(True, index=frame.index)
        for key, value in group.items():
            mask &= frame[key] == value
        frames.append(frame[mask])
    return frames


def kernel_block(tables: Tables) -> str:
    """Per training adversary (the base variant of each dataset / model / loss): how far the clean
    subset's kernel is from its final form early in training (kernel distance and the polar view's
    ``r``), its velocity in the first and the last segment, the clean and attacked test accuracy
    of the top eigen-features against those of high rank at the final epoch, and the penultimate
    layer's power-law exponent ``alpha`` clean and under PGD; then the sentences answering the
    three questions of config/kernel.yaml with these numbers."""
    dynamics = tables.kernel_dynamics
    if dynamics is None or dynamics.empty:
        raise FindingsError("no kernel_dynamics table: run a config with kernel.enabled (config/kernel.yaml)")
    summary = tables.summary
    epochs = sorted(int(e) for e in dynamics["epoch"].unique())
    final = epochs[-1]
    early = next(e for e in epochs if e >= SETTLE_FRACTION * final and e > 0)
    lines = [
        (f"**Kernel and spectrum views** (`results/tables/kernel*.parquet`, `spectra.parquet`), mean over {_seeds(summary)}: "
         f"the trace NTK of each cell's fixed subset of training images; *distance to final* is Fort et al.'s kernel distance "
         f"S(K_t, K_T) at epoch {early} (the first checkpoint at {SETTLE_FRACTION:.0%} of the {final} epochs), *r* the polar "
         f"view's ||K_t − K_0|| / ||K_T − K_0|| there; velocity is S per epoch in the first and the last segment; eigen-feature "
         f"accuracy is on clean / PGD test images, ranks {', '.join(map(str, LOW_RANKS))} (mean) and ≥ {HIGH_RANK} (mean); "
         f"alpha is the penultimate layer's, final epoch, clean / PGD."),
        "",
    ]
    rows, found = [], {}
    for group in _groups(summary):
        for adversary in _ordered(summary[summary["dataset"] == group["dataset"]]["adversary"], ADVERSARIES):
            cell = dict(group, adversary=adversary, variant=BASE_VARIANT)
            d, k, sp = _kernel_views(tables, cell)
            clean = d[d["set"] == "clean"] if "set" in d.columns else d

            def value(frame, metric, what, **where):
                f = frame[frame["metric"] == metric]
                for key, v in where.items():
                    f = f[f[key] == v] if not callable(v) else f[v(f[key])]
                return _seed_mean(f, what)

            numbers = _Found()
            for name, get in (
                ("settle", lambda: value(clean, "distance_to_final", "settle", epoch=early)),
                ("r", lambda: value(clean, "polar_r", "r", epoch=early)),
                ("v_first", lambda: value(clean, "velocity", "velocity", epoch=epochs[1])),
                ("v_last", lambda: value(clean, "velocity", "velocity", epoch=final)),
                ("low_clean", lambda: value(k, "eigen_feature_accuracy", "eigen", set="clean", index=lambda i: i.isin(LOW_RANKS))),
                ("low_pgd", lambda: value(k, "eigen_feature_accuracy", "eigen", set="pgd", index=lambda i: i.isin(LOW_RANKS))),
                ("high_clean", lambda: value(k, "eigen_feature_accuracy", "eigen", set="clean", index=lambda i: i >= HIGH_RANK)),
                ("high_pgd", lambda: value(k, "eigen_feature_accuracy", "eigen", set="pgd", index=lambda i: i >= HIGH_RANK)),
                ("alpha_clean", lambda: value(sp, "alpha", "alpha", layer=PENULTIMATE, perturbation="clean", epoch=final)),
                ("alpha_pgd", lambda: value(sp, "alpha", "alpha", layer=PENULTIMATE, perturbation="pgd", epoch=final)),
            ):
                try:
                    numbers[name] = get()
                except (_Missing, KeyError):
                    pass
            found[adversary] = numbers

            def show(name, fmt, numbers=numbers):
                return fmt(numbers[name]) if name in numbers else MISSING

            rows.append([f"`{adversary}`", show("settle", acc), show("r", two), f"{show('v_first', sig)} / {show('v_last', sig)}",
                         f"{show('low_clean', acc)} / {show('low_pgd', acc)}", f"{show('high_clean', acc)} / {show('high_pgd', acc)}",
                         f"{show('alpha_clean', two)} / {show('alpha_pgd', two)}"])
    lines += _table(["trained with", f"distance to final (epoch {early})", f"r (epoch {early})", "velocity first / last",
                     f"eigen-features {', '.join(map(str, LOW_RANKS))} clean / PGD", f"eigen-features ≥ {HIGH_RANK} clean / PGD",
                     "alpha clean / PGD"], rows)
    sentences = _kernel_sentences(found, early)
    return "\n".join(lines + [""] + [f"- {text}" for text in sentences]) + "\n"


def _kernel_sentences(found: dict, early: int) -> list[str]:
    """The three questions, each answered for every adversarial training against ``st``."""
    st = found.get("st", _Found())
    out = []
    for adversary in [a for a in found if a != "st"]:
        numbers = found[adversary]

        def settle(numbers=numbers, adversary=adversary):
            a, b = numbers["settle"], st["settle"]
            return (f"Does the `{adversary}` kernel settle earlier? At epoch {early} it is {acc(a)} from its final form against "
                    f"`st`'s {acc(b)}: {pick(b, a, 'yes, it is closer', 'no, it is farther', 'no difference at this precision', acc)}"
                    f" (r {two(numbers['r'])} against {two(st['r'])}).")

        def features(numbers=numbers, adversary=adversary):
            low, high = numbers["low_pgd"], numbers["high_pgd"]
            return (f"Do `{adversary}`'s top eigen-features stay robust? On PGD test images they reach {acc(low)} "
                    f"(ranks {', '.join(map(str, LOW_RANKS))}) against {acc(high)} (ranks ≥ {HIGH_RANK}): accuracy "
                    f"{pick(low, high, 'falls', 'rises', 'does not change', acc)} with rank; `st`'s top eigen-features reach "
                    f"{acc(st['low_pgd'])} under PGD ({pick(low, st['low_pgd'], 'below', 'above', 'the same as', acc)} `{adversary}`'s).")

        def alpha(numbers=numbers, adversary=adversary):
            a, b = numbers["alpha_clean"], st["alpha_clean"]
            return (f"Does alpha differ? The penultimate spectrum of `{adversary}` decays with alpha {two(a)} (clean) and "
                    f"{two(numbers['alpha_pgd'])} (PGD), `st`'s with {two(b)} and {two(st['alpha_pgd'])}: "
                    f"{pick(a, b, 'steeper', 'flatter', 'the same', two)} under adversarial training.")

        out += _sentences(settle, features, alpha)
    return out


class _Found(dict):
    """One adversary's numbers of the kernel block: a number the tables lack raises :class:`_Missing`,
    so the sentence quoting it is left out (:func:`_sentences`)."""

    def __missing__(self, key):
        raise _Missing(key)


# ---------------------------------------------------------------------------------------------
# blocks in documents

BLOCKS: dict[str, Callable[[Tables], str]] = {
    "default": default_block, "imbalance": imbalance_block, "related": related_block, "mnist1d": mnist1d_block,
    "kernel": kernel_block,
}
"""The findings blocks by name (the config key ``findings``: the schema's enum is this list)."""


def markers(name: str) -> tuple[str, str]:
    return f"<!-- findings:{name}:start -->", f"<!-- findings:{name}:end -->"


def block(name: str, tables: Tables) -> str:
    """Block ``name`` generated from ``tables``, without its markers."""
    if name not in BLOCKS:
        raise FindingsError(f"unknown findings block {name!r}; known: {', '.join(BLOCKS)}")
    return BLOCKS[name](tables)


def marked(name: str, tables: Tables) -> str:
    """Block ``name`` between its two marker lines."""
    start, end = markers(name)
    return f"{start}\n{block(name, tables)}{end}\n"


def locate(text: str, name: str, where: str = "the document") -> tuple[int, int]:
    """Line indices (0-based) of block ``name``'s start and end markers in ``text``."""
    start, end = markers(name)
    lines = text.splitlines()
    found = {m: [i for i, line in enumerate(lines) if line.strip() == m] for m in (start, end)}
    if len(found[start]) != 1 or len(found[end]) != 1:
        count = {m: len(found[m]) for m in (start, end)}
        raise FindingsError(f"{where}: findings:{name}: needs one line {start} and one line {end} (found {count[start]} and {count[end]})")
    first, last = found[start][0], found[end][0]
    if last < first:
        raise FindingsError(f"{where}: findings:{name}: the end marker comes before the start marker")
    return first, last


def _tokens(line: str) -> list[str]:
    return re.findall(r"-?\d[\d.,]*°?%?|\w+|[^\w\s]", line)


def differences(document: str, name: str, tables: Tables, where: str = "the document") -> list[str]:
    """One line per difference between ``document``'s block ``name`` and the block ``tables``
    give: ``WHERE:LINE: findings:NAME: ...`` with the differing words (or the whole line)."""
    first, last = locate(document, name, where)
    have = document.splitlines()[first + 1:last]
    want = block(name, tables).splitlines()
    out = []
    tag = f"findings:{name}"
    matcher = difflib.SequenceMatcher(a=have, b=want, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        pairs = list(zip(range(i1, i2), range(j1, j2))) if op == "replace" else []
        for i, j in pairs:
            a, b = _tokens(have[i]), _tokens(want[j])
            words = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
            changes = [(" ".join(a[x1:x2]) or "(nothing)", " ".join(b[y1:y2]) or "(nothing)")
                       for o, x1, x2, y1, y2 in words.get_opcodes() if o != "equal"]
            detail = "; ".join(f"the document has {d!r}, the run gives {r!r}" for d, r in changes)
            out.append(f"{where}:{first + 2 + i}: {tag}: {detail}")
        for i in range(i1 + len(pairs), i2):
            out.append(f"{where}:{first + 2 + i}: {tag}: a line the run does not give: {have[i]!r}")
        for j in range(j1 + len(pairs), j2):
            out.append(f"{where}:{first + 2 + i1 + len(pairs)}: {tag}: a line the run gives is missing: {want[j]!r}")
    return out


def updated(document: str, name: str, tables: Tables, where: str = "the document") -> str:
    """``document`` with block ``name`` replaced by the block ``tables`` give."""
    first, last = locate(document, name, where)
    lines = document.splitlines(keepends=True)
    return "".join(lines[:first + 1]) + block(name, tables) + "".join(lines[last:])


def document(name: str, tables: Tables) -> str:
    """The findings document of a run (``results/findings/NAME.md``)."""
    return (f"# Findings: {name}\n\nGenerated from this run's tables by `python -m ncrobust.findings write --results RESULTS "
            f"--config {name}` (`ncrobust.findings`).\n\n{marked(name, tables)}")


def write(name: str, results: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write the findings document of the run in ``results`` (default ``results/findings/NAME.md``)."""
    text = document(name, Tables.read(results))
    path = Path(output) if output is not None else Path(results) / "findings" / f"{name}.md"
    _write_text(path, text)
    return path


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file renamed into place: no half-written document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ncrobust.findings", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command, help in (("write", "write RESULTS/findings/NAME.md"), ("check", "exit 1 when DOC's block differs from the run's"),
                          ("update", "rewrite DOC's block from the run's tables")):
        sub = commands.add_parser(command, help=help)
        if command != "write":
            sub.add_argument("doc", help="a Markdown document holding the block between its markers")
        sub.add_argument("--results", default="results", help="the run's results directory (default: results)")
        sub.add_argument("--config", required=True, choices=list(BLOCKS), help="the findings block")
    args = parser.parse_args(argv)
    try:
        if args.command == "write":
            print(write(args.config, args.results))
            return 0
        tables = Tables.read(args.results)
        path = Path(args.doc)
        try:
            text = path.read_text()
        except OSError as err:
            raise FindingsError(f"{path}: cannot be read ({err.strerror})") from None
        if args.command == "check":
            found = differences(text, args.config, tables, str(path))
            for line in found:
                print(line)
            if not found:
                print(f"{path}: findings:{args.config}: as the tables in {args.results} give it")
            return 1 if found else 0
        new = updated(text, args.config, tables, str(path))
        if new != text:
            _write_text(path, new)
        print(f"{path}: findings:{args.config}: {'updated' if new != text else 'unchanged'}")
        return 0
    except FindingsError as err:
        print(f"ncrobust: findings: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
