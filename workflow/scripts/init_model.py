# The config slice (params) plus execution settings from snakemake.config: see ncrobust.stages.
from ncrobust.io import job_log
from ncrobust.jobs.pipeline import init_cell
from ncrobust.stages import job_config

with job_log(snakemake.log[0]):
    cell = snakemake.params.cell
    config = job_config("init_model", snakemake.params.config, snakemake.config, cell=cell)
    init_cell(config, cell, snakemake.input.data, snakemake.output.checkpoint)
