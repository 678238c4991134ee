"""Hooks at declared seams: a plan of taps (accessor, layer, module path, direction, layout) built from the
standard names, captures that copy each tap's rows as the forward pass runs, seams that keep hooks working where
CUDA graphs are replayed, and the writers of each prompt's rows into its region of a host block: the capturing
device itself (``device_rows``: a GPU's kernels into mapped host memory, or the CPU), or device-to-host
transfers that overlap the next pass and copier threads (``transfer``, ``rows``), into host memory reused once
dropped (``host_memory``). Both engines extract through these."""
