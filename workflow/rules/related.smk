# The related questions (README, "Related questions: mixup, normalized features, near collapse"):
# Fisher et al.'s mixup geometry and Tirer et al.'s near-collapse probe on every cell's final
# checkpoint, each opt-in (evaluation.mixup_geometry.enabled, probe.enabled; off in the embedded
# default, which then has none of these jobs; the switches MIXUP_GEOMETRY and PROBE are in
# common.smk). Their figures come from their own rule, so that switching them on reruns none of
# the eight study figures; the report's front page shows them too. Their input functions
# (related_files, related_outputs) are in common.smk.


rule mixup_geometry:
    """Fisher et al.'s picture on one checkpoint: features of mixed examples in the plane of two classifier rows."""
    input:
        data=data_file,
        checkpoint=f"{RUN}/checkpoints/epoch{{epoch}}.pt",
    output:
        points=update(f"{RUN}/mixup_geometry/points_epoch{{epoch}}.parquet"),
        summary=update(f"{RUN}/mixup_geometry/summary_epoch{{epoch}}.parquet"),
    log:
        f"{RUN}/logs/mixup_geometry_epoch{{epoch}}.log",
    params:
        config=config_slice("mixup_geometry"),
        cell=cell_of,
    threads: config["threads"]
    resources:
        **job_resources("evaluate"),
    script:
        "../scripts/mixup_geometry.py"


rule probe:
    """Tirer et al.'s near-collapse probe on one checkpoint: NC1 of the regularised solution against NC1 of a layer's features."""
    input:
        data=data_file,
        checkpoint=f"{RUN}/checkpoints/epoch{{epoch}}.pt",
    output:
        update(f"{RUN}/probe/probe_epoch{{epoch}}.parquet"),
    log:
        f"{RUN}/logs/probe_epoch{{epoch}}.log",
    params:
        config=config_slice("probe"),
        cell=cell_of,
    threads: config["threads"]
    resources:
        **job_resources("cpu"),
    script:
        "../scripts/probe.py"


if MIXUP_GEOMETRY or PROBE:  # a rule without outputs cannot exist

    rule related_figures:
        """The grid's mixup-geometry and probe tables and their figures (only what the config switches on)."""
        input:
            **({"points": related_files("mixup_geometry"), "summaries": related_files("mixup_summary")} if MIXUP_GEOMETRY else {}),
            **({"probes": related_files("probe")} if PROBE else {}),
        output:
            **(
                {
                    "mixup_geometry": f"{RESULTS}/tables/mixup_geometry.parquet",
                    "mixup_figure": report(
                        f"{RESULTS}/figures/mixup.png",
                        caption="../report/mixup.rst",
                        category="Figures",
                        labels={"figure": "mixup"},
                    ),
                }
                if MIXUP_GEOMETRY
                else {}
            ),
            **(
                {
                    "probe": f"{RESULTS}/tables/probe.parquet",
                    "probe_figure": report(
                        f"{RESULTS}/figures/probe.png",
                        caption="../report/probe.rst",
                        category="Figures",
                        labels={"figure": "probe"},
                    ),
                }
                if PROBE
                else {}
            ),
        log:
            f"{RESULTS}/logs/related_figures.log",
        resources:
            **job_resources("cpu"),
        script:
            "../scripts/related_figures.py"
