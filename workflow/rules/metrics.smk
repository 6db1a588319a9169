rule metrics:
    input:
        features=RUN + "/features/epoch{epoch}.pt",
    output:
        RUN + "/metrics/epoch{epoch}.parquet",
    log:
        RUN + "/logs/metrics_epoch{epoch}.log",
    params:
        cell=cell_of,
    resources:
        **job_resources("cpu"),
    script:
        "../scripts/metrics.py"


rule aggregate:
    input:
        metrics=metrics_files(),
        training=training_logs(),
    output:
        metrics=f"{RESULTS}/tables/metrics.parquet",
        training=f"{RESULTS}/tables/training.parquet",
        summary=f"{RESULTS}/tables/summary.parquet",
        summary_md=f"{RESULTS}/tables/summary.md",
        summary_csv=f"{RESULTS}/tables/summary.csv",
    log:
        f"{RESULTS}/logs/aggregate.log",
    resources:
        **job_resources("cpu"),
    script:
        "../scripts/aggregate.py"
