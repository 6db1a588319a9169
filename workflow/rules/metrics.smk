# The metric tables of the whole grid. Each checkpoint's metrics file is written by rule evaluate
# (evaluate.smk), in the job that ran the attacks: see ncrobust.jobs.pipeline.evaluate_cell.
rule aggregate:
    """Gather every cell's metrics, training logs and robustness into the tables and the summary."""
    input:
        metrics=metrics_files(),
        training=training_logs(),
        robustness=robustness_files(),
        epoch_metrics=epoch_metrics_files(),
    output:
        **({"epoch_metrics": update(f"{RESULTS}/tables/epoch_metrics.parquet")} if EPOCH_MEASURE else {}),
        metrics=update(f"{RESULTS}/tables/metrics.parquet"),
        training=update(f"{RESULTS}/tables/training.parquet"),
        robustness=update(f"{RESULTS}/tables/robustness.parquet"),
        summary=update(f"{RESULTS}/tables/summary.parquet"),
        summary_md=report(
            update(f"{RESULTS}/tables/summary.md"),
            caption="../report/summary_md.rst",
            category="Tables",
            labels={"table": "summary (Markdown)"},
        ),
        summary_csv=report(
            update(f"{RESULTS}/tables/summary.csv"),
            caption="../report/summary.rst",
            category="Tables",
            labels={"table": "summary (CSV)"},
        ),
    log:
        f"{RESULTS}/logs/aggregate.log",
    resources:
        **job_resources("cpu"),
    script:
        "../scripts/aggregate.py"
