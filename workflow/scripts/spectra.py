# The config slice (params) plus execution settings from snakemake.config: see ncrobust.stages.
from ncrobust.io import job_log
from ncrobust.jobs.kernel import spectra_cell
from ncrobust.stages import job_config

with job_log(snakemake.log[0]):
    cell = snakemake.params.cell
    config = job_config("spectra", snakemake.params.config, snakemake.config, cell=cell)
    spectra_cell(config, cell, snakemake.input.data, snakemake.input.checkpoint, snakemake.output[0])
