"""torch.fx plumbing: reading and copying graphs the way torch.export writes them, and the weights they hold."""
