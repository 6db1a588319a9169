# No conda env or container per rule (`snakemake --lint`): the project installs into one Python
# environment (`pip install -e .`, see the README), which every rule runs in.
rule prepare_data:
    """Load a dataset, split it, and save it as one tensor file (images in [0,1], labels, classes)."""
    output:
        f"{RESULTS}/data/{{dataset}}.pt",
    log:
        f"{RESULTS}/logs/prepare_data/{{dataset}}.log",
    params:
        config=config_slice("prepare_data"),
    resources:
        **job_resources("cpu"),
    script:
        "../scripts/prepare_data.py"
