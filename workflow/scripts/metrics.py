from ncrobust.io import job_log
from ncrobust.pipeline import metrics_cell

with job_log(snakemake.log[0]):
    metrics_cell(snakemake.params.cell, snakemake.input.features, snakemake.output[0])
