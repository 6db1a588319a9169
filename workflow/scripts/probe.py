# The config slice (params) plus execution settings from snakemake.config: see ncrobust.stages.
from ncrobust.io import job_log
from ncrobust.jobs.related import probe_cell
from ncrobust.stages import job_config

with job_log(snakemake.log[0]):
    cell = snakemake.params.cell
    probe_cell(
        job_config("probe", snakemake.params.config, snakemake.config, cell=cell), cell,
        snakemake.input.data, snakemake.input.checkpoint, snakemake.output[0],
    )
