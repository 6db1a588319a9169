from ncrobust.io import job_log
from ncrobust.pipeline import prepare_data

with job_log(snakemake.log[0]):
    prepare_data(snakemake.params.config, snakemake.wildcards.dataset, snakemake.output[0])
