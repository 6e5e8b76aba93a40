"""Command-line tools: data preparation, tokenizer training, checkpoint conversion."""
