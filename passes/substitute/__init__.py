"""Layer substitution: passes that replace a Conv/Linear by a factorized subgraph (the math is in decompose/)."""
