from ncrobust.io import job_log
from ncrobust.pipeline import evaluate_cell

with job_log(snakemake.log[0]):
    evaluate_cell(
        snakemake.params.config, snakemake.params.cell, snakemake.input.data, snakemake.input.checkpoint,
        snakemake.output.metrics, snakemake.output.projection, snakemake.output.get("features"),
        max_points=snakemake.params.max_points,
    )
