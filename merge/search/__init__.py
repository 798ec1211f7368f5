"""Recipe search: the layer-wise space a search varies (space) and deterministic,
resumable CMA-ES over it (cmaes)."""
