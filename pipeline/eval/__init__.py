"""Evaluation of exported Hugging Face folders: BABILong (long-context reasoning, `babilong/`) and perplexity."""
