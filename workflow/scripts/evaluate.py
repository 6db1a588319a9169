from ncrobust.io import job_log
from ncrobust.pipeline import evaluate_cell

with job_log(snakemake.log[0]):
    evaluate_cell(snakemake.params.config, snakemake.params.cell, snakemake.input.data, snakemake.input.checkpoint, snakemake.output.features)
