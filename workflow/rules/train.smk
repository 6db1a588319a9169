rule init_model:
    input:
        data=f"{RESULTS}/data/{{dataset}}.pt",
    output:
        checkpoint=RUN + "/checkpoints/epoch0.pt",
    log:
        RUN + "/logs/init.log",
    params:
        config=config,
        cell=cell_of,
    resources:
        **job_resources("cpu"),
    script:
        "../scripts/init_model.py"


rule train:
    input:
        data=f"{RESULTS}/data/{{dataset}}.pt",
        previous=previous_checkpoint,
    output:
        checkpoint=RUN + "/checkpoints/epoch{epoch}.pt",
        log_table=RUN + "/train_log/epoch{epoch}.parquet",
    log:
        RUN + "/logs/train_epoch{epoch}.log",
    wildcard_constraints:
        epoch=r"[1-9]\d*",
    params:
        config=config,
        cell=cell_of,
    threads: config["threads"]
    resources:
        **job_resources("train"),
    group:
        "train_{dataset}_{model}_{loss}_{adversary}_{seed}" if config["group_training"] else None
    script:
        "../scripts/train.py"
