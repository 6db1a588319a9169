# The findings block of the run (config `findings`) from its tables: torch-free, so no job_log
# (which loads torch); the log holds what the library prints.
import contextlib

from ncrobust.findings import write

with open(snakemake.log[0], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    write(snakemake.params.block, snakemake.params.results, snakemake.output[0])
