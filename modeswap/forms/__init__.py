"""The input forms a swap takes and gives back: GraphModule, ExportedProgram and the modal module."""
