rule figures:
    """Draw every figure of the study from the tables and the simplex projections."""
    input:
        metrics=f"{RESULTS}/tables/metrics.parquet",
        training=f"{RESULTS}/tables/training.parquet",
        projections=projection_files(),
    output:
        **{
            name: report(f"{RESULTS}/figures/{name}.png", caption=f"../report/{name}.rst", category="Figures")
            for name in FIGURES
        },
    log:
        f"{RESULTS}/logs/figures.log",
    threads: 4  # one process per figure (Snakemake caps this at --cores)
    resources:
        **job_resources("cpu"),
    script:
        "../scripts/figures.py"
