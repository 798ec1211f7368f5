"""The demo's tiny models: synthetic tasks (tasks), a character-level Llama and its
training loop (training), the base and domain experts (experts), and a heterogeneous
GPT-2 expert (hetero). Used by the demo, tests and benchmarks; product code never imports it."""
