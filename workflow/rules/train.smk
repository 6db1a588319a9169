rule init_model:
    """Epoch 0 of a cell: the seeded initialisation of its model."""
    input:
        data=data_file,
    output:
        checkpoint=update(f"{RUN}/checkpoints/epoch0.pt"),
    log:
        f"{RUN}/logs/init.log",
    wildcard_constraints:
        model="|".join(GRID["model"]),  # the trained models; an external network's checkpoint is imported
    params:
        config=config_slice("init_model"),
        cell=cell_of,  # not a rerun trigger: a Cell has no repr Snakemake records, and it is in the path
    resources:
        **job_resources("cpu"),
    script:
        "../scripts/init_model.py"


rule train:
    """Train a cell from its previous checkpoint to the next one (ST, PGD-AT or TRADES)."""
    input:
        data=data_file,
        previous=previous_checkpoint,
    output:
        # training.epoch_measure: the segment's per-epoch measurement of the training-time examples
        **({"epoch_metrics": update(f"{RUN}/epoch_metrics/epoch{{epoch}}.parquet")} if EPOCH_MEASURE else {}),
        checkpoint=update(f"{RUN}/checkpoints/epoch{{epoch}}.pt"),
        log_table=update(f"{RUN}/train_log/epoch{{epoch}}.parquet"),
    log:
        f"{RUN}/logs/train_epoch{{epoch}}.log",
    wildcard_constraints:
        epoch=r"[1-9]\d*",
        model="|".join(GRID["model"]),
    params:
        config=config_slice("train"),
        cell=cell_of,
    threads: config["threads"]
    resources:
        **job_resources("train"),
    # one group name for every cell: a cell's chain of segments is one connected component, so
    # each cell is one group job, and `--group-components train=k` packs k cells into one
    group:
        "train" if config["group_training"] else None
    script:
        "../scripts/train.py"


if EXTERNAL:

    rule import_network:
        """An external network's weights file as its cell's checkpoint of the last epoch (docs/own-network.md)."""
        input:
            data=data_file,
            weights=external_weights,
        output:
            checkpoint=update(f"{RUN}/checkpoints/epoch{FINAL_EPOCH}.pt"),
        log:
            f"{RUN}/logs/import.log",
        wildcard_constraints:
            model="|".join(map(re.escape, EXTERNAL)),
        params:
            config=config_slice("import_network"),
            cell=cell_of,
            epoch=FINAL_EPOCH,
        resources:
            **job_resources("cpu"),
        script:
            "../scripts/import_network.py"
