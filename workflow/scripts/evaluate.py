# The config slice (params) plus execution settings from snakemake.config: see ncrobust.stages.
from ncrobust.io import job_log
from ncrobust.jobs.pipeline import evaluate_cell
from ncrobust.stages import job_config

with job_log(snakemake.log[0]):
    cell = snakemake.params.cell
    evaluate_cell(
        job_config("evaluate", snakemake.params.config, snakemake.config, cell=cell), cell,
        snakemake.input.data, snakemake.input.checkpoint,
        snakemake.output.metrics, snakemake.output.projection, snakemake.output.get("features"),
    )
