"""The HuggingFace backend (through nnsight): ``batcher`` keeps the padded batch's attention mask and tells
which models left padding would shift; ``extraction`` runs batched forward passes with taps."""
