from ncrobust.io import job_log
from ncrobust.jobs.kernel import kernel_dynamics_cell

with job_log(snakemake.log[0]):
    kernel_dynamics_cell(snakemake.params.top_k, snakemake.params.cell, list(snakemake.input.kernels), snakemake.output[0])
