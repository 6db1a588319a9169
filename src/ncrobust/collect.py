"""The grid's tables and summary from whatever cells have finished: while the workflow runs, or
after a ``--keep-going`` run in which some jobs failed.

``python -m ncrobust.collect [--configfile FILE ...]`` prints one line per cell (complete, partial
or missing, and how far it got) and writes the tables the ``aggregate`` rule writes, with the same
function (:func:`aggregate`), into ``RESULTS/partial/tables/``: Snakemake's own outputs are never
touched, so the running workflow reruns nothing because of it. A partial cell is in the tables up
to its last evaluated epoch, and the summary labels each row with its epoch.

Torch-free, like the tables: the ``aggregate`` job and this command only read Parquet files (the
config check builds a model only for a config that sets model options, as the Snakefile's does).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ncrobust.config import ConfigError, load_config_file, validate_config
from ncrobust.io import CorruptFileError, ExplainedError, read_parquet, write_parquet, write_text
from ncrobust.stages import GRID_AXES, KERNEL_VIEW_FILES, RUN_LAYOUT, all_cells, checkpoint_epochs, evaluated_epochs, is_external, merge
from ncrobust.tables import stack, summary, summary_markdown

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.yaml"
"""The Snakefile's embedded default (``config/config.yaml`` of the repository the package is in)."""

PARTIAL = "partial"
"""Where the tables of the finished cells go, under ``results``."""


def aggregate(
    metrics: list[str], training: list[str], robustness: list[str], out_metrics: str, out_training: str,
    out_robustness: str, out_summary: str, out_summary_md: str, out_summary_csv: str,
    epoch_metrics: list[str] = (), out_epoch_metrics: str | None = None,
) -> None:
    """All cells into one table each, plus the final-epoch summary (Parquet, Markdown, CSV); with
    ``out_epoch_metrics`` also the per-epoch measurement of training (``training.epoch_measure``).
    The ``aggregate`` rule and :func:`collect` both write their tables with this."""
    if out_epoch_metrics is not None:
        write_parquet(_stacked("epoch_metrics", epoch_metrics), out_epoch_metrics)
    m = _stacked("metrics", metrics)
    write_parquet(m, out_metrics)
    write_parquet(_stacked("training", training), out_training)
    r = _stacked("robustness", robustness)
    write_parquet(r, out_robustness)
    s = summary(m, r)
    write_parquet(s, out_summary)
    write_text(s.to_csv(index=False), out_summary_csv)
    write_text(summary_markdown(s), out_summary_md)
    log.info("summary: %d rows -> %s", len(s), out_summary)


def _stacked(name: str, paths: list[str]):
    frame = stack([read_parquet(p) for p in paths])
    log.info("%s: %d files, %d rows", name, len(paths), len(frame))
    return frame


@dataclass(frozen=True)
class CellProgress:
    """How far one cell of the grid got: which of its files exist."""

    cell: dict
    directory: Path
    trained: tuple[int, ...]  # the checkpoint epochs whose training segment's log exists
    evaluated: tuple[int, ...]  # the evaluated epochs whose metrics exist
    robustness: bool | None  # its strong evaluation exists (None: the config runs none)
    measured: tuple[int, ...]  # the segments whose per-epoch measurement exists (training.epoch_measure)
    expected_trained: tuple[int, ...]
    expected_evaluated: tuple[int, ...]
    expect_measured: bool
    external: bool = False  # an external network's cell: its one checkpoint is imported, not trained

    @classmethod
    def of(cls, config: dict, cell: dict, results: Path) -> CellProgress:
        directory = results / RUN_LAYOUT.format(**cell)
        segments = tuple(checkpoint_epochs(config)[1:])
        evaluated = tuple(evaluated_epochs(config))
        strong = config["evaluation"]["strong"]["enabled"]
        measure = config["training"]["epoch_measure"]
        if is_external(config, cell):  # one checkpoint, the last epoch's: "trained" once it is imported
            final = segments[-1]
            imported = (directory / f"checkpoints/epoch{final}.pt").exists()
            return cls(
                cell, directory, trained=(final,) if imported else (),
                evaluated=(final,) if (directory / f"metrics/epoch{final}.parquet").exists() else (),
                robustness=(directory / f"robustness/epoch{final}.parquet").exists() if strong else None,
                measured=(), expected_trained=(final,), expected_evaluated=(final,), expect_measured=False, external=True,
            )
        return cls(
            cell, directory,
            trained=tuple(e for e in segments if (directory / f"train_log/epoch{e}.parquet").exists()),
            evaluated=tuple(e for e in evaluated if (directory / f"metrics/epoch{e}.parquet").exists()),
            robustness=(directory / f"robustness/epoch{segments[-1]}.parquet").exists() if strong else None,
            measured=tuple(e for e in segments if measure and (directory / f"epoch_metrics/epoch{e}.parquet").exists()),
            expected_trained=segments, expected_evaluated=evaluated, expect_measured=measure,
        )

    @property
    def name(self) -> str:
        return "/".join(f"seed{self.cell[a]}" if a == "seed" else str(self.cell[a]) for a in GRID_AXES)

    @property
    def status(self) -> str:
        done = [self.trained == self.expected_trained, self.evaluated == self.expected_evaluated,
                self.robustness is not False, not self.expect_measured or self.measured == self.expected_trained]
        if all(done):
            return "complete"
        if not (self.trained or self.evaluated or self.robustness or self.measured):
            return "missing"
        return "partial"

    @property
    def robustness_in_tables(self) -> bool:
        """The strong evaluation goes in the tables once the last evaluated epoch has its metrics:
        the summary puts it beside that epoch's numbers, never an earlier one's."""
        return bool(self.robustness) and self.expected_evaluated[-1] in self.evaluated

    def files(self, kind: str) -> list[str]:
        """The cell's existing files of one table (``metrics``, ``training``, ``robustness``, ``epoch_metrics``,
        and the kernel views' ``kernel``, ``kernel_dynamics``, ``spectra``)."""
        d = self.directory
        if kind in VIEW_TABLES:
            if kind == "kernel_dynamics" and self.external:  # one checkpoint: no dynamics
                return []
            epochs = self.expected_trained if self.external else (0, *self.expected_trained)
            paths = dict.fromkeys(str(d / KERNEL_VIEW_FILES[kind].format(e=e)) for e in epochs)
            return [p for p in paths if Path(p).exists()]
        if kind == "metrics":
            return [str(d / f"metrics/epoch{e}.parquet") for e in self.evaluated]
        if kind == "training":
            return [] if self.external else [str(d / f"train_log/epoch{e}.parquet") for e in self.trained]
        if kind == "epoch_metrics":
            return [str(d / f"epoch_metrics/epoch{e}.parquet") for e in self.measured]
        if kind == "robustness":
            return [str(d / f"robustness/epoch{self.expected_trained[-1]}.parquet")] if self.robustness_in_tables else []
        raise ValueError(f"unknown table {kind!r}")

    def line(self) -> str:
        """One line: the status, the cell, and how far it got."""
        if self.status == "missing":
            return f"missing   {self.name}: nothing yet"
        parts = [("imported" if self.trained else "not imported yet") if self.external else
                 _progress("trained to epoch", self.trained, self.expected_trained, last=True),
                 _progress("evaluated", self.evaluated, self.expected_evaluated)]
        if self.expect_measured:
            parts.append(_progress("per-epoch measurement", self.measured, self.expected_trained))
        if self.robustness is not None:
            parts.append("strong evaluation done" if self.robustness else "no strong evaluation yet")
            if self.robustness and not self.robustness_in_tables:
                parts[-1] += f" (in the tables once epoch {self.expected_evaluated[-1]} is evaluated)"
        line = f"{self.status:<9} {self.name}: {', '.join(parts)}"
        if self.status == "partial":
            line += f"; in the tables at epoch {self.evaluated[-1]}" if self.evaluated else "; not in the tables yet"
        return line


def _progress(what: str, have: tuple[int, ...], want: tuple[int, ...], last: bool = False) -> str:
    if last:  # training: how far (and which segments, when one in between is missing)
        return f"{what} {have[-1] if have else 0}/{want[-1]}" + ("" if have == want[: len(have)] else f" (segments {_epochs(have)})")
    return f"{what} {_epochs(have) or 'none'} (of {_epochs(want)})"


def _epochs(epochs: tuple[int, ...]) -> str:
    return ", ".join(map(str, epochs))


VIEW_TABLES = ("kernel", "kernel_dynamics", "spectra")
"""The kernel views' tables (:data:`ncrobust.stages.KERNEL_VIEW_FILES`), of every checkpoint epoch
(the dynamics need epoch 0 too)."""


class NothingToCollect(ExplainedError):
    """No cell of the grid has an evaluated epoch yet; the message says what produces one."""


@dataclass(frozen=True)
class Collected:
    cells: list[CellProgress]
    tables: Path

    @property
    def summary_md(self) -> Path:
        return self.tables / "summary.md"

    def report(self) -> str:
        """The per-cell lines, the counts and where the tables are."""
        counts = {s: sum(c.status == s for c in self.cells) for s in ("complete", "partial", "missing")}
        lines = [c.line() for c in self.cells]
        lines.append(f"{len(self.cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        lines.append(f"tables of the cells so far: {self.tables}/ (summary: {self.summary_md})")
        return "\n".join(lines) + "\n"


def collect(config: dict, *, workdir: str | os.PathLike = ".", out: str | os.PathLike | None = None) -> Collected:
    """The tables and summary of a validated ``config``'s grid from the cells' files that exist
    (under ``workdir``, where Snakemake runs), written to ``out`` (default ``RESULTS/partial``)
    by :func:`aggregate`, and ``progress.txt`` beside them: the per-cell lines. Snakemake's own
    outputs are neither read nor written."""
    results = Path(workdir) / config["results"]
    cells = [CellProgress.of(config, cell, results) for cell in all_cells(config)]
    if not any(c.evaluated for c in cells):
        raise NothingToCollect(
            f"{results}: no cell of the grid has an evaluated epoch yet ({len(cells)} cells; "
            f"{sum(c.status != 'missing' for c in cells)} begun): the workflow's evaluate jobs write them "
            "(`snakemake --cores N`, with the same config); run this again once one has finished")
    out = results / PARTIAL if out is None else Path(out)
    tables = out / "tables"
    files = {kind: [f for c in cells for f in c.files(kind)] for kind in ("metrics", "training", "robustness", "epoch_metrics")}
    measure = config["training"]["epoch_measure"]
    aggregate(
        files["metrics"], files["training"], files["robustness"], *(str(tables / n) for n in (
            "metrics.parquet", "training.parquet", "robustness.parquet", "summary.parquet", "summary.md", "summary.csv")),
        files["epoch_metrics"], str(tables / "epoch_metrics.parquet") if measure else None,
    )
    views = [*(("kernel", "kernel_dynamics") if config["kernel"]["enabled"] else ()),
             *(("spectra",) if config["spectra"]["enabled"] else ())]
    for kind in views:  # the kernel_figures rule's tables, of the cells so far
        write_parquet(_stacked(kind, [f for c in cells for f in c.files(kind)]), str(tables / f"{kind}.parquet"))
    collected = Collected(cells, tables)
    write_text(collected.report(), out / "progress.txt")
    return collected


def load_config(configfiles: list[str], overrides: list[str], workdir: str | os.PathLike = ".") -> dict:
    """The validated config as Snakemake would see it: ``configfiles`` merged in order (none: the
    embedded default, :data:`DEFAULT_CONFIG`), then ``KEY=VALUE`` overrides (YAML values)."""
    config: dict = {}
    for path in configfiles or [DEFAULT_CONFIG]:
        config = merge(config, load_config_file(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--config {item!r}: expected KEY=VALUE (e.g. results=DIR)")
        config = merge(config, {key: yaml.safe_load(value)})
    return validate_config(config, base_dir=workdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ncrobust.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configfile", nargs="+", default=[], help="the run's config file(s), as given to snakemake "
                        "(default: the embedded config/config.yaml)")
    parser.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE", help="overrides, as given to snakemake")
    parser.add_argument("--directory", "-d", default=".", help="the directory snakemake runs in (default: here)")
    parser.add_argument("--out", help="where to write the tables (default: RESULTS/partial)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.configfile, args.config, args.directory)
        collected = collect(config, workdir=args.directory, out=args.out)
    except ConfigError as err:
        print(f"ncrobust: config error: {err}", file=sys.stderr)
        return 1
    except (NothingToCollect, CorruptFileError) as err:
        print(f"ncrobust: {err}", file=sys.stderr)
        return 1
    print(collected.report(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
