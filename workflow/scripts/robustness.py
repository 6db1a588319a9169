from ncrobust.io import job_log
from ncrobust.pipeline import robustness_cell

with job_log(snakemake.log[0]):
    robustness_cell(snakemake.params.config, snakemake.params.cell, snakemake.input.data, snakemake.input.checkpoint, snakemake.output[0])
