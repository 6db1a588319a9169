# ncrobust: Neural Collapse under adversarial perturbation and adversarial training.
# The grid, validation and input functions live in workflow/rules/common.smk.
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless a config file is given (`--configfile config/paper.yaml`): the
# given file replaces it rather than being merged into it, so a key left out is not inherited.
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
