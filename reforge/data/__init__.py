"""Reading text data: BEIR folders (corpus, queries, qrels) and JSONL files, with errors that name file and line."""
