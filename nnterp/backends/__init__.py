"""Backends: the engines that run a standardized model, and the machinery they share.

- ``hf/``: HuggingFace through nnsight (the padded batch's attention mask, extraction by plain hooks);
- ``vllm/``: vLLM through nnsight (engine start and stop, worker and runner, CPU worker, meta build, the
  collection of results, extraction on the engine); vllm is imported only by the modules that need it;
- ``distributed/``: tensor-parallel parameter gathers and pipeline-parallel stages;
- ``taps/``: hooks at declared seams (which module, which direction, which layout), the captures they fill,
  host transfers and each prompt's rows: what extraction reads on both engines.

Backends import the core only; the model classes (``nnterp.standardized``) and everything above import them.
"""
