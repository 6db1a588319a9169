# The config slice (params) plus execution settings from snakemake.config: see ncrobust.stages.
from ncrobust.io import job_log
from ncrobust.jobs.pipeline import train_cell
from ncrobust.stages import job_config

with job_log(snakemake.log[0]):
    cell = snakemake.params.cell
    train_cell(
        job_config("train", snakemake.params.config, snakemake.config, cell=cell),
        cell,
        snakemake.input.data,
        snakemake.input.previous,
        int(snakemake.wildcards.epoch),
        snakemake.output.checkpoint,
        snakemake.output.log_table,
        snakemake.output.get("epoch_metrics"),
    )
