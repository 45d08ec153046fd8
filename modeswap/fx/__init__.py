"""torch.fx plumbing: reading and copying graphs the way torch.export writes them, and the weights they hold.

``torch_private`` is every private torch name modeswap uses, each with why.
"""
