rule prepare_data:
    """Load a dataset, split it (and subsample it, for a variant with dataset overrides), and save it as one tensor file."""
    output:
        DATA,
    log:
        f"{RESULTS}/logs/prepare_data/{{dataset}}/{{data_variant}}.log",
    params:
        config=config_slice("prepare_data"),
    resources:
        **job_resources("cpu"),
    script:
        "../scripts/prepare_data.py"
