# The config slice (params) plus execution settings from snakemake.config: see ncrobust.stages.
from ncrobust.io import job_log
from ncrobust.jobs.kernel import kernel_cell
from ncrobust.stages import job_config

with job_log(snakemake.log[0]):
    cell = snakemake.params.cell
    config = job_config("kernel", snakemake.params.config, snakemake.config, cell=cell)
    kernel_cell(config, cell, snakemake.input.data, snakemake.input.checkpoint, snakemake.params.final,
                snakemake.output.kernels, snakemake.output.rows)
