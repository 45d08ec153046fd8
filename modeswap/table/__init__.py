"""The op table: one rule per train/eval-sensitive ATen op, the ops no rule owns, and what this torch aliases."""
