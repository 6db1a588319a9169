from ncrobust.io import job_log
from ncrobust.jobs.pipeline import epoch_figures

with job_log(snakemake.log[0]):
    epoch_figures(snakemake.input[0], dict(snakemake.output.items()))
