from ncrobust.io import job_log
from ncrobust.jobs.pipeline import figures

with job_log(snakemake.log[0]):
    figures(
        snakemake.input.metrics, snakemake.input.training, dict(snakemake.output.items()),
        list(snakemake.input.projections), workers=snakemake.threads, variants=snakemake.params.variants,
    )
