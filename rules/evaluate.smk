# One evaluator for every model variant: both tasks, parameters, FLOPs and latency.


rule evaluate:
    input:
        f"{R}/models/{{variant}}",
    output:
        f"{R}/metrics/{{variant}}.json",
    params:
        spec=spec(config["evaluate"]),
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpus=res("evaluate", "gpus"),
    log:
        f"{LOGS}/evaluate/{{variant}}.log",
    benchmark:
        f"{LOGS}/benchmarks/evaluate/{{variant}}.tsv"
    conda:
        "../environment.yml"
    shell:
        "{UNISPARSE} evaluate {input} --spec {params.spec} --out {output} 2> {log}"
