# Stage 2: one training job per (dataset, run id, seed).


rule train:
    input:
        cache="results/data/{dataset}/images.h5",
        archive=get_train_archive,
        backbone=get_backbone_weights,
    output:
        metrics="results/runs/{dataset}/{run}/seed{seed}/metrics.json",
        features="results/runs/{dataset}/{run}/seed{seed}/features.npz",
        predictions="results/runs/{dataset}/{run}/seed{seed}/predictions.csv",
        epochs="results/runs/{dataset}/{run}/seed{seed}/epochs.csv",
        model="results/runs/{dataset}/{run}/seed{seed}/model.pt",
        config="results/runs/{dataset}/{run}/seed{seed}/config.json",
    log:
        "results/logs/train/{dataset}/{run}/seed{seed}.log",
    benchmark:
        "results/benchmarks/train/{dataset}/{run}/seed{seed}.tsv"
    params:
        out=subpath(output.metrics, parent=True),
        archive=get_train_archive_args,
        args=get_train_args,
    threads: 4
    resources:
        mem_mb=get_train_mem_mb,
        gpu=1,
    conda:
        "../../envs/slfer.yaml"
    shell:
        "slfer train --cache {input.cache} {params.archive} --out {params.out}"
        " {params.args} --device auto --workers {threads} > {log} 2>&1"
