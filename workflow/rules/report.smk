# Tables (CSV + Markdown) and Figures 3 and 4 from finished runs.


rule table:
    input:
        metrics=get_table_metrics,
    output:
        csv=report(
            "results/{table}.csv",
            caption="../report/table.rst",
            category="Tables",
        ),
        markdown="results/{table}.md",
    log:
        "results/logs/report/{table}.log",
    wildcard_constraints:
        table="table1|table2|table3a|table3b",
    params:
        args=get_table_report_args,
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../../envs/slfer.yaml"
    shell:
        "slfer-report table --kind {wildcards.table} --out {output.csv} {params.args} > {log} 2>&1"


rule figure3:
    input:
        metrics=get_figure3_metrics,
    output:
        csv="results/figure3.csv",
        markdown="results/figure3.md",
        figure=report(
            "results/figure3.png",
            caption="../report/figure3.rst",
            category="Figures",
        ),
    log:
        "results/logs/report/figure3.log",
    params:
        args=get_figure3_report_args,
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../../envs/slfer.yaml"
    shell:
        "slfer-report figure3 --out {output.csv} --figure {output.figure} {params.args} > {log} 2>&1"


rule figure4:
    input:
        features=get_figure4_features,
    output:
        figure=report(
            "results/figure4.png",
            caption="../report/figure4.rst",
            category="Figures",
        ),
    log:
        "results/logs/report/figure4.log",
    params:
        panels=get_figure4_panels,
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/slfer.yaml"
    shell:
        "slfer-report figure4 --out {output.figure} {params.panels} > {log} 2>&1"
