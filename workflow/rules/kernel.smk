# The kernel and spectrum views (docs/kernel.md): Tsilivis & Kempe's empirical NTK of every evaluated
# checkpoint and its dynamics over a cell's checkpoints, Nassar et al.'s representation spectra. Each
# opt-in (kernel.enabled, spectra.enabled; off in the embedded default, which then has none of these
# jobs). Their tables and figures come from their own rule, so switching them on reruns none of the
# study figures. Their input functions (kernel_files, kernel_outputs) are in common.smk.


rule kernel:
    """One checkpoint's empirical NTK on the cell's fixed training subset (clean and attacked): its spectrum, alignment and, at the final epoch, the eigen-features' accuracy."""
    input:
        data=data_file,
        checkpoint=f"{RUN}/checkpoints/epoch{{epoch}}.pt",
    output:
        kernels=update(f"{RUN}/kernel/epoch{{epoch}}.pt"),
        rows=update(f"{RUN}/kernel/epoch{{epoch}}.parquet"),
    log:
        f"{RUN}/logs/kernel_epoch{{epoch}}.log",
    params:
        config=config_slice("kernel"),
        cell=cell_of,
        final=lambda wildcards: int(wildcards.epoch) == FINAL_EPOCH,
    threads: config["threads"]
    resources:
        **job_resources("evaluate"),
    script:
        "../scripts/kernel.py"


rule kernel_dynamics:
    """A trained cell's kernel distances, velocity and polar view across its checkpoints."""
    input:
        kernels=cell_kernels,
    output:
        update(f"{RUN}/kernel/dynamics.parquet"),
    log:
        f"{RUN}/logs/kernel_dynamics.log",
    params:
        top_k=config["kernel"]["top_k"],
        cell=cell_of,
    resources:
        **job_resources("cpu"),
    script:
        "../scripts/kernel_dynamics.py"


rule spectra:
    """The power-law exponent of every tap's covariance spectrum on one checkpoint, clean and perturbed."""
    input:
        data=data_file,
        checkpoint=f"{RUN}/checkpoints/epoch{{epoch}}.pt",
    output:
        update(f"{RUN}/spectra/epoch{{epoch}}.parquet"),
    log:
        f"{RUN}/logs/spectra_epoch{{epoch}}.log",
    params:
        config=config_slice("spectra"),
        cell=cell_of,
    threads: config["threads"]
    resources:
        **job_resources("evaluate"),
    script:
        "../scripts/spectra.py"


if KERNEL or SPECTRA:  # a rule without outputs cannot exist

    rule kernel_figures:
        """The grid's kernel and spectra tables and their figures (only what the config switches on)."""
        input:
            **({"kernel": kernel_files("kernel"), "dynamics": kernel_files("kernel_dynamics")} if KERNEL else {}),
            **({"spectra": kernel_files("spectra")} if SPECTRA else {}),
        output:
            **(
                {
                    "kernel": f"{RESULTS}/tables/kernel.parquet",
                    "kernel_dynamics": f"{RESULTS}/tables/kernel_dynamics.parquet",
                }
                if KERNEL
                else {}
            ),
            **({"spectra": f"{RESULTS}/tables/spectra.parquet"} if SPECTRA else {}),
            **{
                f"{name}_figure": report(
                    f"{RESULTS}/figures/{name}.png",
                    caption=f"../report/{name}.rst",
                    category="Figures",
                    labels={"figure": name},
                )
                for name in KERNEL_VIEW_FIGURES
            },
        log:
            f"{RESULTS}/logs/kernel_figures.log",
        resources:
            **job_resources("cpu"),
        script:
            "../scripts/kernel_figures.py"
