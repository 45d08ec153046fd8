"""The eager side: check and capture, which work from the eager model when the graph alone is not enough."""
