# The config slice (params) plus execution settings from snakemake.config: see ncrobust.stages.
from ncrobust.io import job_log
from ncrobust.jobs.pipeline import import_cell
from ncrobust.stages import job_config

with job_log(snakemake.log[0]):
    cell = snakemake.params.cell
    config = job_config("import_network", snakemake.params.config, snakemake.config, cell=cell)
    import_cell(config, cell, snakemake.input.data, snakemake.input.weights, snakemake.params.epoch, snakemake.output.checkpoint)
