"""Parallel engines: ``tp`` gathers the full logical parameter from tensor-parallel shards; ``pp`` gives each
pipeline stage the values other stages own (lazy placeholders, published values, parameters)."""
