from ncrobust.io import job_log
from ncrobust.pipeline import projection_cell

with job_log(snakemake.log[0]):
    projection_cell(snakemake.params.cell, snakemake.input.features, snakemake.output[0], max_points=snakemake.params.max_points)
