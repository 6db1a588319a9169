from ncrobust.io import job_log
from ncrobust.jobs.kernel import kernel_figures

with job_log(snakemake.log[0]):
    out = snakemake.output
    kernel_figures(
        list(snakemake.input.get("kernel", [])), list(snakemake.input.get("dynamics", [])),
        list(snakemake.input.get("spectra", [])),
        tables={k: out[k] for k in ("kernel", "kernel_dynamics", "spectra") if k in out.keys()},
        figures={k: out[f"{k}_figure"] for k in ("kernel_dynamics", "kernel_spectrum", "spectra") if f"{k}_figure" in out.keys()},
    )
