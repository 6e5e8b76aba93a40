"""Data preparation: jsonl -> NeoX `.bin/.idx` datasets, and the quickstart corpus."""
