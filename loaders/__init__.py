"""What training jobs read: loaders over shards and exports (WebDataset, uid lists)."""
