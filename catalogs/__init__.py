"""Build catalog (DuckDB)."""
from catalogs.catalog import Catalog, format_build, format_builds

__all__ = ["Catalog", "format_build", "format_builds"]
