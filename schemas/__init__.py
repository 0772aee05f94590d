"""The core record, reject and manifest schemas and the build spec's top level. Stages declare their own params
and columns in their files (stages/)."""
from schemas.columns import INPUT_SCHEMA, PAIR_SCHEMA, REJECT_SCHEMA, SCHEMA_VERSION, build_schema, stage_fields  # noqa: F401
from schemas.records import make_uid, normalize_url  # noqa: F401
from schemas.spec import BuildSpec, SpecError, load_spec, parse_spec  # noqa: F401
