# ncrobust: Neural Collapse under adversarial perturbation and adversarial training.
# The grid, validation and input functions live in workflow/rules/common.smk.
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless a config file is given (`--configfile config/paper.yaml`): the
# given file replaces it rather than being merged into it, so a key left out is not inherited.
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


# The report's front page (`snakemake --report results/report.html`): what the run is, the summary
# table and the figures with their captions (built by rule report_page).
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/report.smk"


rule all:
    """Every table, figure and per-cell output of the grid, and the report's front page."""
    input:
        final_outputs(),
        f"{RESULTS}/report/front_page.html",
    default_target: True
