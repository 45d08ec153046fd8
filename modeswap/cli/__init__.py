"""The ``modeswap`` command: its parser, the demo, and the tables it prints."""
