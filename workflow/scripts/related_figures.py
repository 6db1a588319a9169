from ncrobust.io import job_log
from ncrobust.jobs.related import related_figures

with job_log(snakemake.log[0]):
    out = snakemake.output
    related_figures(
        list(snakemake.input.get("points", [])), list(snakemake.input.get("summaries", [])),
        list(snakemake.input.get("probes", [])),
        tables={k: out[k] for k in ("mixup_geometry", "probe") if k in out.keys()},
        figures={k: out[f"{k}_figure"] for k in ("mixup", "probe") if f"{k}_figure" in out.keys()},
    )
