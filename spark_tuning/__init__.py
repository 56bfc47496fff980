"""spark-tuning: fine-tune Hugging Face models on text that lives in Spark."""

__version__ = "0.1.0"
