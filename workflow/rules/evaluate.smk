rule evaluate:
    input:
        data=f"{RESULTS}/data/{{dataset}}.pt",
        checkpoint=RUN + "/checkpoints/epoch{epoch}.pt",
    output:
        metrics=RUN + "/metrics/epoch{epoch}.parquet",
        projection=RUN + "/projection/epoch{epoch}.parquet",
        **({"features": RUN + "/features/epoch{epoch}.pt"} if config["evaluation"]["keep_features"] else {}),
    log:
        RUN + "/logs/evaluate_epoch{epoch}.log",
    params:
        config=config,
        cell=cell_of,
        max_points=300,
    threads: config["threads"]
    resources:
        **job_resources("evaluate"),
    script:
        "../scripts/evaluate.py"


rule robustness:
    input:
        data=f"{RESULTS}/data/{{dataset}}.pt",
        checkpoint=RUN + "/checkpoints/epoch{epoch}.pt",
    output:
        RUN + "/robustness/epoch{epoch}.parquet",
    log:
        RUN + "/logs/robustness_epoch{epoch}.log",
    params:
        config=config,
        cell=cell_of,
    threads: config["threads"]
    resources:
        **job_resources("evaluate"),
    script:
        "../scripts/robustness.py"
