"""The vLLM backend (through nnsight). Nothing here is imported until a ``StandardizedVLLM`` is made.

| module | owns |
|---|---|
| ``engine`` | engine arguments, the worker class, start (logging, expert group, meta build) and shutdown, sharing the model with workers, layout keys |
| ``backend`` | the read/write policy (copies of reused buffers, gathered parameters) |
| ``readonly`` | the tensor type of reads that refuses in-place edits |
| ``worker`` | nnterp's GPU worker and runner: pipeline stages, the shared model copy |
| ``cpu`` | the same on vLLM's CPU platform |
| ``meta`` | vLLM code made to run while nnsight builds the module tree on the meta device |
| ``collect`` | a trace's results brought home as a local trace has them |
| ``embedding_scale`` | the factor vLLM applies to embeddings outside the embedding module |
| ``extraction`` / ``extraction_worker`` | extraction: the client stepping the engine, the worker's hooks |
| ``graphs`` | CUDA graphs: which reads are served at replay, the seams the worker installs for them, refusals |
"""
