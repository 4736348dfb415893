"""The JSON schema of `reuseport-ctl churn --json`, and the small check of it
the tests run on real reports (the JSON Schema subset it uses: type, enum,
required, properties, additionalProperties, items, minimum)."""
from __future__ import annotations

from reuseport_ctl.experiments.churn import MODES

_INT = {"type": "integer", "minimum": 0}
_NUM = {"type": "number", "minimum": 0}
_COUNTS = {"type": "object", "additionalProperties": _INT}
_MODE = {"type": "string", "enum": list(MODES)}
_PROGRAM = {"type": ["object", "null"],
            "required": ["attach_type", "refuse", "target", "selected", "migrated",
                         "refused", "no_slot", "migrated_to"],
            "properties": {"attach_type": {"type": "string",
                                           "enum": ["select", "select_or_migrate"]},
                           "refuse": {"type": "boolean"}, "target": {"type": "string"},
                           "selected": _INT, "migrated": _INT, "refused": _INT,
                           "no_slot": _INT, "migrated_to": _COUNTS}}
_ERRORS = {"type": "object", "required": ["refused", "reset", "timeout", "other"],
           "additionalProperties": _INT}

SCHEMA = {
    "type": "object",
    "required": ["experiment", "version", "kernel", "cpus", "netns", "config", "sysctl",
                 "queued", "churn"],
    "properties": {
        "experiment": {"type": "string", "enum": ["churn"]},
        "version": {"type": "integer", "enum": [1]},
        "kernel": {"type": "string"},
        "cpus": {"type": "integer", "minimum": 1},
        "netns": {"type": "string", "enum": ["private", "host"]},
        "config": {"type": "object",
                   "required": ["workers", "duration", "linger", "modes", "queued",
                                "schedule"]},
        "sysctl": {"type": "object", "required": ["name", "before", "after", "restored"],
                   "properties": {"name": {"type": "string"}, "before": {"type": "string"},
                                  "after": {"type": "string"},
                                  "restored": {"type": "boolean"}}},
        "queued": {"type": "array", "items": {
            "type": "object",
            "required": ["mode", "k", "queued", "queued_at_close", "ok", "reset", "timeout",
                         "other", "served_by", "migrated", "migrate_failed", "program"],
            "properties": {"mode": _MODE, "k": _INT, "queued": _INT, "queued_at_close": _INT,
                           "first_slot": _INT, "second_slot": _INT,
                           "ok": _INT, "reset": _INT, "timeout": _INT, "other": _INT,
                           "served_by": _COUNTS, "migrated": _INT, "migrate_failed": _INT,
                           "program": _PROGRAM}}},
        "churn": {"type": "array", "items": {
            "type": "object",
            "required": ["mode", "sysctl", "program", "removal", "duration_s", "conns", "ok",
                         "errors", "failed", "resets_per_10k", "failed_per_10k", "leaves",
                         "joins", "queued_at_close", "migrated", "migrate_failed",
                         "program_stats", "final_workers", "per_worker", "events",
                         "timeline"],
            "properties": {
                "mode": _MODE, "sysctl": {"type": "integer", "enum": [0, 1]},
                "program": {"type": ["string", "null"],
                            "enum": ["select", "select_or_migrate", None]},
                "removal": {"type": "string", "enum": ["abrupt", "drain"]},
                "duration_s": _NUM, "conns": _INT, "ok": _INT, "errors": _ERRORS,
                "failed": _INT, "resets_per_10k": _NUM, "failed_per_10k": _NUM,
                "leaves": _INT, "joins": _INT, "queued_at_close": _INT,
                "migrated": _INT, "migrate_failed": _INT, "program_stats": _PROGRAM,
                "final_workers": {"type": "array", "items": _INT},
                "per_worker": _COUNTS,
                "events": {"type": "array", "items": {
                    "type": "object",
                    "required": ["t", "action", "slot", "skipped", "queued", "took_s",
                                 "workers"],
                    "properties": {"t": _NUM, "action": {"type": "string",
                                                         "enum": ["add", "remove"]},
                                   "slot": {"type": ["integer", "null"]},
                                   "skipped": {"type": "boolean"},
                                   "queued": {"type": ["integer", "null"]},
                                   "took_s": {"type": ["number", "null"]},
                                   "workers": _INT}}},
                "timeline": {"type": "array", "items": {
                    "type": "object",
                    "required": ["t", "conns", "ok", "refused", "reset", "timeout", "other"],
                    "properties": {"t": {"type": "number"},
                                   "conns": _INT, "ok": _INT, "refused": _INT,
                                   "reset": _INT, "timeout": _INT, "other": _INT}}}}}},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def validate(obj, schema: dict = SCHEMA, path: str = "$") -> list[str]:
    """The JSON Schema subset SCHEMA uses (type, enum, required, properties,
    additionalProperties, items, minimum): the list of violations, [] if none."""
    errs: list[str] = []
    types = schema.get("type")
    if types is not None:
        types = types if isinstance(types, list) else [types]
        if not any(_is(obj, t) for t in types):
            return [f"{path}: expected {'/'.join(types)}, got {type(obj).__name__}"]
    if "enum" in schema and obj not in schema["enum"]:
        errs.append(f"{path}: {obj!r} not one of {schema['enum']}")
    if "minimum" in schema and isinstance(obj, (int, float)) and not isinstance(obj, bool) \
            and obj < schema["minimum"]:
        errs.append(f"{path}: {obj} < {schema['minimum']}")
    if isinstance(obj, dict):
        for k in schema.get("required", ()):
            if k not in obj:
                errs.append(f"{path}: missing {k!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for k, v in obj.items():
            if k in props:
                errs += validate(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                errs += validate(v, extra, f"{path}.{k}")
    if isinstance(obj, list) and "items" in schema:
        for i, v in enumerate(obj):
            errs += validate(v, schema["items"], f"{path}[{i}]")
    return errs


def _is(v, t: str) -> bool:
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, _TYPES[t])
