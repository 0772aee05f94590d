"""The embedded demo, everything of the synthetic shapes domain in one package: the scenes and their renderer
(scenes), a noisy web-crawl corpus built from them (corpus) and its HTTP server (server), the demo spec
(demo.yaml; flows/demo.py builds it), the scorer's training data and evaluation (train_data, scorer_eval, train_demo.yaml), and the
`render` image editor, registered with negatives.editors on import. No stage depends on this package."""
from demo import render_editor  # noqa: F401  (registers the `render` editor)
