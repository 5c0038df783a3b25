# Tidy tables aggregated from the metrics JSON files (small, local jobs).


localrules:
    probes_table,
    moe_table,


rule probes_table:
    input:
        code=code("aggregate"),
        metrics=probe_metrics(),
    output:
        report(f"{R}/tables/probes.csv", caption="../workflow/report/probes_table.rst", category="Tables"),
    log:
        f"{LOGS}/tables/probes.log",
    conda:
        "../environment.yml"
    shell:
        "unisparse --no-progress aggregate {input.metrics:q} --out {output:q} 2> {log:q}"


rule moe_table:
    input:
        code=code("aggregate"),
        metrics=moe_table_inputs(),
    output:
        report(f"{R}/tables/moe.csv", caption="../workflow/report/moe_table.rst", category="Tables"),
    log:
        f"{LOGS}/tables/moe.log",
    conda:
        "../environment.yml"
    shell:
        "unisparse --no-progress aggregate {input.metrics:q} --out {output:q} 2> {log:q}"
