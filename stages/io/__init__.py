"""Reading and writing pairs: URL lists, downloads, corpora, shards."""
