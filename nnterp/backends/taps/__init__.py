"""Hooks at declared seams: a plan of taps (accessor, layer, module path, direction, layout) built from the
standard names, captures that copy each tap's rows as the forward pass runs, seams that keep hooks working where CUDA graphs are
replayed, device-to-host transfers that
overlap the next pass, and copier threads writing each prompt's rows out of them into a tensor of its own. Both engines extract through these."""
