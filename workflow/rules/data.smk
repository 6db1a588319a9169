rule prepare_data:
    output:
        f"{RESULTS}/data/{{dataset}}.pt",
    log:
        f"{RESULTS}/logs/prepare_data/{{dataset}}.log",
    params:
        config=config,
    resources:
        **job_resources("cpu"),
    script:
        "../scripts/prepare_data.py"
