"""The lean runtime: engine backends, tokenizer, pipeline and CLI. Imports no torch."""
