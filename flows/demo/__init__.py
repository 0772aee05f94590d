"""The embedded demo: a synthetic shapes domain (scenes), a noisy web-crawl corpus built from it (corpus) and its
HTTP server (server). Import from the submodules: flows.demo.scenes, flows.demo.corpus, flows.demo.server."""
