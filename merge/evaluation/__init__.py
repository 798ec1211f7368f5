"""Scoring models: evaluation suites, exact-match accuracy and answer loss (evaluate), and
the fitness of a candidate recipe merged in memory (fitness)."""
