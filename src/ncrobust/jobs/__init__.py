"""The workflow's stages as file-to-file functions: one call per Snakemake script."""
