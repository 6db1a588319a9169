# The front page only copies text and links the figures, and the findings only read the tables
# (each well under a second): on a cluster they run where Snakemake runs instead of waiting in the
# queue for a job of their own.
localrules:
    report_page,
    findings,


rule figures:
    """Draw every figure of the study from the tables and the simplex projections."""
    input:
        metrics=f"{RESULTS}/tables/metrics.parquet",
        training=f"{RESULTS}/tables/training.parquet",
        projections=projection_files(),
    output:
        **{
            name: report(
                f"{RESULTS}/figures/{name}.png", caption=f"../report/{name}.rst", category="Figures", labels={"figure": name}
            )
            for name in DRAWN_FIGURES
        },
    log:
        f"{RESULTS}/logs/figures.log",
    params:
        # canonical: the variants' key order (or the grid's variant order) must not redraw the figures
        variants=canonical({name: config["variants"][name] for name in GRID["variant"] if name in config["variants"]}),
    threads: 4  # one process per figure (Snakemake caps this at --cores)
    resources:
        **job_resources("cpu"),
    script:
        "../scripts/figures.py"


if EPOCH_MEASURE:  # a rule without outputs cannot exist

    rule epoch_figures:
        """The per-epoch measurement of the training-time examples (training.epoch_measure) as curves."""
        input:
            f"{RESULTS}/tables/epoch_metrics.parquet",
        output:
            **{
                name: report(
                    f"{RESULTS}/figures/{name}.png", caption=f"../report/{name}.rst", category="Figures", labels={"figure": name}
                )
                for name in EPOCH_FIGURES
            },
        log:
            f"{RESULTS}/logs/epoch_figures.log",
        resources:
            **job_resources("cpu"),
        script:
            "../scripts/epoch_figures.py"


CAPTIONS = [Path(workflow.source_path(f"../report/{name}.rst")).read_text() for name in REPORT_FIGURES]
# what the front page says the run is, in an order of its own: a reordered grid or mapping reruns nothing
RUN_DESCRIPTION = canonical(
    {
        "grid": {
            axis: sorted(values, key=ADVERSARIES.index) if axis == "adversary" else sorted(values)
            for axis, values in GRID.items()
        },
        "epochs": config["training"]["epochs"],
        "perturbations": sorted(config["evaluation"]["perturbations"], key=PERTURBATIONS.index),
    }
)


rule report_page:
    """The report's front door: the overview the report opens on (what the run is, the summary
    table; workflow/report/workflow.rst includes it) and the front page, one standalone HTML page
    with the overview and every figure with its caption."""
    input:
        summary=f"{RESULTS}/tables/summary.parquet",
        figures=[f"{RESULTS}/figures/{name}.png" for name in REPORT_FIGURES],
    output:
        overview=f"{RESULTS}/report/overview.html",
        page=report(
            f"{RESULTS}/report/front_page.html",
            caption="../report/front_page.rst",
            category="Overview",
            labels={"page": "front page"},
        ),
    log:
        f"{RESULTS}/logs/report_page.log",
    params:
        names=REPORT_FIGURES,
        # the captions' text, not their paths: an edited caption reruns this job, a moved project does not;
        # a function, so that Snakemake does not read a caption's braces as wildcards
        captions=lambda wildcards: CAPTIONS,
        run=RUN_DESCRIPTION,
    resources:
        **job_resources("cpu"),
    script:
        "../scripts/report_page.py"


rule findings:
    """The run's findings block (config `findings`): the table and the conclusion sentences that
    ncrobust.findings generates from the tables; `python -m ncrobust.findings check DOC` compares
    a document's copy with it."""
    input:
        summary=f"{RESULTS}/tables/summary.parquet",
        metrics=f"{RESULTS}/tables/metrics.parquet",
        robustness=f"{RESULTS}/tables/robustness.parquet",
        related=[f"{RESULTS}/tables/{name}.parquet" for name, on in (("mixup_geometry", MIXUP_GEOMETRY), ("probe", PROBE)) if on],
        views=[
            f"{RESULTS}/tables/{name}.parquet"
            for name, on in (("kernel", KERNEL), ("kernel_dynamics", KERNEL), ("spectra", SPECTRA))
            if on
        ],
    output:
        FINDINGS,
    log:
        f"{RESULTS}/logs/findings.log",
    params:
        block=config["findings"],
    resources:
        **job_resources("cpu"),
    script:
        "../scripts/findings.py"
