"""Tokens for training and evaluation: tokenizers, Megatron indexed datasets (writing and
reading), the embedded corpora, and the per-iteration batch layout."""
