from ncrobust.io import job_log
from ncrobust.collect import aggregate  # torch-free: the job starts in a second

with job_log(snakemake.log[0]):
    out = snakemake.output
    aggregate(
        snakemake.input.metrics, snakemake.input.training, snakemake.input.robustness,
        out.metrics, out.training, out.robustness, out.summary, out.summary_md, out.summary_csv,
        list(snakemake.input.epoch_metrics), out.get("epoch_metrics"),
    )
