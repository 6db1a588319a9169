from ncrobust.io import job_log
from ncrobust.pipeline import train_cell

with job_log(snakemake.log[0]):
    train_cell(
        snakemake.params.config,
        snakemake.params.cell,
        snakemake.input.data,
        snakemake.input.previous,
        int(snakemake.wildcards.epoch),
        snakemake.output.checkpoint,
        snakemake.output.log_table,
    )
