# The findings block of the run (config `findings`) from its tables: torch-free, so no job_log
# (which loads torch); the log holds what the library prints.
import contextlib
from pathlib import Path

from ncrobust.findings import write

with open(snakemake.log[0], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    results = Path(snakemake.input.summary).parents[1]  # the run's directory: RESULTS/tables/summary.parquet
    write(snakemake.params.block, results, snakemake.output[0])
