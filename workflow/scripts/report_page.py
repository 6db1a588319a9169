from ncrobust.figures.report_page import front_page
from ncrobust.io import job_log

with job_log(snakemake.log[0]):
    front_page(
        snakemake.input.summary, dict(zip(snakemake.params.names, snakemake.input.figures)),
        dict(zip(snakemake.params.names, snakemake.params.captions)), snakemake.output.page,
        snakemake.output.overview, snakemake.params.run,
    )
