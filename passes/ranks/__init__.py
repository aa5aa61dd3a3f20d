"""Rank choice: per-layer policies (rank, ratio, energy, EVBMF) and global budgets (knapsack, ALDS's shared error)."""
