# Dataset preparation: synthetic demo datasets and the local image cache.


rule synth_dataset:
    output:
        manifest="{synth_root}/manifest.json",
    log:
        "results/logs/synth_dataset/{synth_root}.log",
    params:
        out=subpath(output.manifest, parent=True),
        args=get_synth_args,
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/slfer.yaml"
    shell:
        "slfer-parse synth --out {params.out} {params.args} --workers {threads} --overwrite > {log} 2>&1"


rule image_cache:
    input:
        dataset=get_dataset_input,
    output:
        cache="results/data/{dataset}/images.h5",
    log:
        "results/logs/image_cache/{dataset}.log",
    params:
        args=get_cache_args,
    threads: 2
    resources:
        mem_mb=4000,
    conda:
        "../../envs/slfer.yaml"
    shell:
        "slfer-parse cache {params.args} --out {output.cache} --workers {threads} > {log} 2>&1"
