from ncrobust.io import job_log
from ncrobust.pipeline import init_cell

with job_log(snakemake.log[0]):
    init_cell(snakemake.params.config, snakemake.params.cell, snakemake.input.data, snakemake.output.checkpoint)
