"""Files: PT2 archives of one program or of a modal module, written atomically and read with clear errors."""
