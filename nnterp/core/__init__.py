"""The core: what a standardized name means, whatever engine runs the model.

- ``rename``: standard module names (alias tables, structure, ``RenameConfig``);
- ``layout/``: how each module passes and returns the residual stream (inferred from signatures, parent
  sources and a runtime probe; reviewed snapshots under ``layouts/``);
- ``accessors``: ``layers_output[i]`` and its siblings; ``attention``: ``attention_probabilities[i]``;
- ``backend``: the policy hooks a backend implements for the accessors, and positions in the forward pass;
- ``forward_order``, ``padding``, ``positions``, ``tracing``: reads in forward order, each prompt's real tokens,
  running one computation over many prompts; ``surface``: what the core needs of a model class;
- ``tokens``, ``progress``, ``log``: small shared helpers.

The core imports nothing else from nnterp; every other room may import it.
"""
