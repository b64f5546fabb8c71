"""The engine: step loop, output processing, incremental detokenization."""
