# Figures: papermill notebooks turning the tables into PNG/PDF figures (see rules/figure_targets.smk).
# Each rule runs one notebook of notebooks/ with its parameters; the executed notebook is the rule's
# log, so a notebook that fails keeps its executed copy (with the traceback) in logs/figures/, and
# papermill's non-zero exit fails the job. Only the families whose stage the config enables are
# requested (figure_targets()); `snakemake figures` builds just these.


localrules:
    figures,
    depth_figure,
    width_figure,
    moe_recovery_figure,
    expert_load_figure,
    quality_speed_figure,


rule figures:
    input:
        figure_targets(),


rule depth_figure:
    input:
        notebook="notebooks/depth_curves.ipynb",
        probes=f"{R}/tables/probes.csv",
    output:
        **figure_output("depth_curves", "Depth pruning"),
    log:
        notebook=f"{LOGS}/figures/depth_curves.ipynb",
        stderr=f"{LOGS}/figures/depth_curves.log",
    conda:
        "../environment.yml"
    shell:
        "MPLBACKEND=Agg papermill --no-progress-bar --log-output -k python3 {input.notebook:q} {log.notebook:q}"
        " -r probes {input.probes:q}"
        " -r out_png {output.png:q} -r out_pdf {output.pdf:q} 2> {log.stderr:q}"


rule width_figure:
    input:
        notebook="notebooks/width_curves.ipynb",
        probes=f"{R}/tables/probes.csv",
    output:
        **figure_output("width_curves", "Width reduction"),
    log:
        notebook=f"{LOGS}/figures/width_curves.ipynb",
        stderr=f"{LOGS}/figures/width_curves.log",
    conda:
        "../environment.yml"
    shell:
        "MPLBACKEND=Agg papermill --no-progress-bar --log-output -k python3 {input.notebook:q} {log.notebook:q}"
        " -r probes {input.probes:q}"
        " -r out_png {output.png:q} -r out_pdf {output.pdf:q} 2> {log.stderr:q}"


rule moe_recovery_figure:
    input:
        notebook="notebooks/moe_recovery.ipynb",
        moe=f"{R}/tables/moe.csv",
    output:
        **figure_output("moe_recovery", "MoE"),
    log:
        notebook=f"{LOGS}/figures/moe_recovery.ipynb",
        stderr=f"{LOGS}/figures/moe_recovery.log",
    conda:
        "../environment.yml"
    shell:
        "MPLBACKEND=Agg papermill --no-progress-bar --log-output -k python3 {input.notebook:q} {log.notebook:q}"
        " -r moe {input.moe:q}"
        " -r out_png {output.png:q} -r out_pdf {output.pdf:q} 2> {log.stderr:q}"


rule expert_load_figure:
    input:
        notebook="notebooks/expert_load.ipynb",
        metrics=moe_metrics(),
    output:
        **figure_output("expert_load", "MoE"),
    params:
        metrics=lambda w, input: papermill_yaml(metrics=input.metrics),
    log:
        notebook=f"{LOGS}/figures/expert_load.ipynb",
        stderr=f"{LOGS}/figures/expert_load.log",
    conda:
        "../environment.yml"
    shell:
        "MPLBACKEND=Agg papermill --no-progress-bar --log-output -k python3 {input.notebook:q} {log.notebook:q}"
        " -y {params.metrics:q}"
        " -r out_png {output.png:q} -r out_pdf {output.pdf:q} 2> {log.stderr:q}"


rule quality_speed_figure:
    input:
        notebook="notebooks/quality_speed.ipynb",
        tables=figure_tables(),
    output:
        **figure_output("quality_speed", "Efficiency"),
    params:
        tables=lambda w, input: papermill_yaml(tables=input.tables),
    log:
        notebook=f"{LOGS}/figures/quality_speed.ipynb",
        stderr=f"{LOGS}/figures/quality_speed.log",
    conda:
        "../environment.yml"
    shell:
        "MPLBACKEND=Agg papermill --no-progress-bar --log-output -k python3 {input.notebook:q} {log.notebook:q}"
        " -y {params.tables:q}"
        " -r out_png {output.png:q} -r out_pdf {output.pdf:q} 2> {log.stderr:q}"
