"""What a peer computes, offline, on local files. Never imports ``node/``.

- recipe, params, layers, engine: recipes and their validation, declared parameters,
  layer positions, and the streaming merge engine
- methods/: the merge methods, each declaring its parameters (registry.py)
- io/: reading and writing model folders (sources, writer, dtypes, manifests, model cards,
  atomic writes, JSONL)
- numerics/: exact reductions, the keyed counter RNG, bit packing (same bits on any device), the
  merge's worker threads, fused CPU loops (numba) that write what the torch operations write,
  the CPU's and a GPU's ways of a pass (placement)
- deltas/: codecs, signed delta files, signed containers, screening
- fusion/: probe sets, logit packs, token alignment, fusion, distillation, a round's check
- evaluation/: suites, accuracy and loss, the fitness of a candidate recipe
- search/: the layer-wise recipe space and CMA-ES over it
- toy/: the demo's tiny character model, experts and synthetic tasks (demo, tests and
  benchmarks only; product code never imports it)
"""
