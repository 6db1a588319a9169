# params.config is the job's config slice (what Snakemake compares to decide a rerun);
# job_config adds the execution settings (threads, device, data_root, ...) from snakemake.config,
# which Snakemake does not compare: see ncrobust.stages.
from ncrobust.io import job_log
from ncrobust.jobs.pipeline import prepare_data
from ncrobust.stages import job_config

with job_log(snakemake.log[0]):
    config = job_config("prepare_data", snakemake.params.config, snakemake.config)
    prepare_data(config, snakemake.wildcards.dataset, snakemake.output[0])
