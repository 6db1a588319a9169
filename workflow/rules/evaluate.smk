rule evaluate:
    """Attack one checkpoint with every perturbation; write its NC metrics and simplex projection."""
    input:
        data=data_file,
        checkpoint=f"{RUN}/checkpoints/epoch{{epoch}}.pt",
    output:
        **({"features": f"{RUN}/features/epoch{{epoch}}.pt"} if config["evaluation"]["keep_features"] else {}),
        metrics=update(f"{RUN}/metrics/epoch{{epoch}}.parquet"),
        projection=update(f"{RUN}/projection/epoch{{epoch}}.parquet"),
    log:
        f"{RUN}/logs/evaluate_epoch{{epoch}}.log",
    params:
        config=config_slice("evaluate"),
        cell=cell_of,
    threads: config["threads"]
    resources:
        **job_resources("evaluate"),
    script:
        "../scripts/evaluate.py"


rule robustness:
    """Robust accuracy of a cell's final checkpoint under PGD-10 and the strong attacks (AutoAttack's APGD)."""
    input:
        data=data_file,
        checkpoint=f"{RUN}/checkpoints/epoch{{epoch}}.pt",
    output:
        update(f"{RUN}/robustness/epoch{{epoch}}.parquet"),
    log:
        f"{RUN}/logs/robustness_epoch{{epoch}}.log",
    params:
        config=config_slice("robustness"),
        cell=cell_of,
    threads: config["threads"]
    resources:
        **job_resources("evaluate"),
    script:
        "../scripts/robustness.py"
