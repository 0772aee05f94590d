"""Build catalog (DuckDB)."""
from catalogs.catalog import Catalog, catalog_beside, find_catalog, format_build, format_builds, resolve_build_id

__all__ = ["Catalog", "catalog_beside", "find_catalog", "format_build", "format_builds", "resolve_build_id"]
