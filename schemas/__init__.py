"""Columns, artifact schemas and the build spec: the one place every name is defined."""
from schemas.columns import (  # noqa: F401
    INPUT_SCHEMA,
    PAIR_SCHEMA,
    REJECT_SCHEMA,
    SCHEMA_VERSION,
    STAGE_FIELDS,
    build_schema,
    stage_fields,
)
from schemas.records import make_uid, normalize_url  # noqa: F401
from schemas.spec import BuildSpec, SpecError, load_spec, parse_spec  # noqa: F401
