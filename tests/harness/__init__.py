"""The maintainers' harness, outside the installed package: architecture sweeps (``python -m tests.harness.sweep
--update``), the HF-vs-vLLM sweep, multi-rank drivers for the distributed tests, process isolation, the report
writer of ``docs/architectures.md`` and the known limits it explains failures with. Tests import it as
``harness`` (``tests/`` is on their path); commands run from the repository root as ``tests.harness``."""
