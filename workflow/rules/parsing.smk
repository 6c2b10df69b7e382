# Stage 1: face-parser weights, mask archives (parsed, merged or imported) and Figure 5.


rule download_parser_weights:
    output:
        weights=config["parser"]["weights"],
    log:
        "results/logs/download_parser_weights.log",
    params:
        url=config["parser"]["weights_url"],
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/slfer.yaml"
    shell:
        # NOTE: downloads from the network; the tests never run this rule.
        "slfer-parse download-weights --url {params.url:q} --out {output.weights} > {log} 2>&1"


rule parse_masks:
    input:
        cache="results/data/{dataset}/images.h5",
        weights=get_parser_weights,
    output:
        archive="results/data/{dataset}/parsed/{part}.h5",
    log:
        "results/logs/parse_masks/{dataset}/{part}.log",
    benchmark:
        "results/benchmarks/parse_masks/{dataset}/{part}.tsv"
    params:
        args=get_parse_args,
    threads: 2
    resources:
        mem_mb=8000,
        gpu=get_parse_gpus,
    conda:
        "../../envs/slfer.yaml"
    shell:
        "slfer-parse parse --cache {input.cache} --out {output.archive} {params.args}"
        " --device auto --workers {threads} > {log} 2>&1"


rule merge_shards:
    input:
        shards=get_shards,
    output:
        archive="results/data/{dataset}/merged/masks.h5",
    log:
        "results/logs/merge_shards/{dataset}.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/slfer.yaml"
    shell:
        "slfer-parse merge --out {output.archive} {input.shards} > {log} 2>&1"


rule import_archive:
    input:
        archive=get_shared_archive,
        cache="results/data/{dataset}/images.h5",
    output:
        archive="results/data/{dataset}/imported/masks.h5",
    log:
        "results/logs/import_archive/{dataset}.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/slfer.yaml"
    shell:
        # The validator lists every difference between archive and cache in the log
        # and exits 1 on a mismatch, which fails this job before anything is copied.
        "(slfer-parse validate --archive {input.archive:q} --cache {input.cache}"
        " && cp {input.archive:q} {output.archive}.partial"
        " && mv {output.archive}.partial {output.archive}) > {log} 2>&1"


rule figure5:
    input:
        archive=get_figure5_archive,
        cache=get_figure5_cache,
    output:
        figure=report(
            "results/figure5.png",
            caption="../report/figure5.rst",
            category="Figures",
        ),
    log:
        "results/logs/figure5.log",
    params:
        image_count=EXPERIMENTS["figure5"]["count"],
        image_seed=EXPERIMENTS["figure5"]["seed"],
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/slfer.yaml"
    shell:
        "slfer-parse figure --archive {input.archive} --cache {input.cache} --out {output.figure}"
        " --count {params.image_count} --seed {params.image_seed} > {log} 2>&1"
