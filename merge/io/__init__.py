"""Model folders on disk: reading tensors (sources), writing shards (writer), dtype names,
manifests and content ids of local models, config/tokenizer/model card files, atomic
writes, and JSONL records."""
