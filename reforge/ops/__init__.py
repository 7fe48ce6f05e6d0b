"""Weight-level operations over lazy readers and a streaming writer: diff, fold (adapter -> dense), merge, verify."""
