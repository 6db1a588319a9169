# ncrobust: Neural Collapse under adversarial perturbation and adversarial training.
# The grid, validation and input functions live in workflow/rules/common.smk.
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless a config file is given (`--configfile config/paper.yaml`): the
# given file replaces it rather than being merged into it, so a key left out is not inherited.
# Found next to this Snakefile (also with --directory elsewhere); read by ncrobust first, so that a
# missing file or a YAML error is one line naming the file and the line.
if not workflow.config_settings.configfiles:
    import sys

    sys.path.insert(0, str(Path(workflow.basedir) / "src"))
    from ncrobust.config import ConfigError, load_config_file

    DEFAULT_CONFIG = Path(workflow.basedir) / "config" / "config.yaml"
    try:
        load_config_file(DEFAULT_CONFIG)
    except ConfigError as err:
        sys.stderr.write(f"ncrobust: config error: {err}\n")
        sys.exit(1)

    configfile: DEFAULT_CONFIG


# The report's front page (`snakemake --report results/report.html`): what the run is, the summary
# table and the figures with their captions (built by rule report_page).
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/related.smk"


rule all:
    """Every table, figure and per-cell output of the grid, the report's front page and the findings."""
    input:
        final_outputs(),
        f"{RESULTS}/report/front_page.html",
        related_outputs(),
        FINDINGS,
    default_target: True
