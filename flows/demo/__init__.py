"""The embedded demo: a synthetic shapes domain, a noisy web-crawl corpus built from it, and its HTTP server."""
from flows.demo.corpus import FAULTS, FRACTIONS, generate_corpus
from flows.demo.scenes import Group, Scene, caption, render, render_scene, sample_scene
from flows.demo.server import DemoServer

__all__ = [
    "FAULTS", "FRACTIONS", "DemoServer", "Group", "Scene", "caption", "generate_corpus", "render", "render_scene",
    "sample_scene",
]
