"""The build's I/O, plain Python (no Prefect, no Ray): reading a source (sources: URL lists and corpora; uids: every
row's uid and repeats), downloading (download: img2dataset through fetch's address guard and deadline; reasons: why
a row was not fetched), storage (Location: a local folder or object storage), the build folder and its markers
(build_folder), and shard files with their manifest (shards). The engine (flows.engine) runs these in Ray tasks."""
