"""raylm: train Llama-style language models from a folder of raw text, on one machine or a Ray cluster."""

__version__ = "0.1.0"
