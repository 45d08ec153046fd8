"""The bottom layer: the mode enum, the immutable records modeswap returns, the options users state, its errors."""
