#!/usr/bin/env python3
"""Validates portcullis collector records (JSON lines) against the OCSF schema.

Source of the schema: the PyPI package `pydantic-ocsf` (installed by
`cargo xtask setup`), which bundles the OCSF project's schema exports
(`ocsf/schemas/v1_*.json`, from github.com/ocsf/ocsf-schema) and pydantic
models generated from them.

Two checks per record, against the version in `metadata.version`:
1. the pydantic model of the record's class validates it (types, enums the
   models know, required attributes);
2. a strict check on the schema export itself: every `required` attribute
   of the class (through its `extends` chain) is present, no attribute is
   unknown (at any depth, for objects too; `portcullis` at the top level
   is the one extension attribute allowed, and `unmapped` is free-form),
   `*_id` values are in their enums, `at_least_one`/`just_one` constraints
   hold, and class_uid/category_uid/type_uid agree.
The custom class (portcullis extension, uid 900) is checked as a Base
Event by the strict check (it has no attributes of its own; pydantic-ocsf's
BaseEvent model does not build, so check 1 is skipped for it).

Usage: validate.py FILE...   prints "N records valid" or the problems.
"""
import json
import os
import sys

try:
    import ocsf as ocsf_pkg
except ImportError:
    sys.exit("pydantic-ocsf is not installed: run `cargo xtask setup` "
             "(or `python3 -m pip install pydantic-ocsf`)")

SCHEMA_DIR = os.path.join(os.path.dirname(ocsf_pkg.__file__), "schemas")
CATEGORY_UIDS = {"other": 0, "system": 1, "findings": 2, "iam": 3,
                 "network": 4, "discovery": 5, "application": 6,
                 "remediation": 7, "unmanned_systems": 8}
EXTENSION_UID = 900
CLASS_MODELS = {3002: "Authentication", 4001: "NetworkActivity",
                6002: "ApplicationLifecycle", 6003: "ApiActivity",
                2004: "DetectionFinding"}
SCALAR = {"string_t": str, "integer_t": int, "long_t": int,
          "timestamp_t": int, "port_t": int, "boolean_t": bool,
          "float_t": (int, float), "ip_t": str, "hostname_t": str,
          "username_t": str, "uuid_t": str, "url_t": str, "email_t": str,
          "datetime_t": str, "file_name_t": str, "file_hash_t": str,
          "process_name_t": str, "resource_uid_t": str, "subnet_t": str,
          "mac_t": str, "bytestring_t": str}


class Schema:
    def __init__(self, version):
        path = os.path.join(SCHEMA_DIR, "v" + version.replace(".", "_") + ".json")
        with open(path) as f:
            self.s = json.load(f)
        self.dict = self.s["dictionary"]["attributes"]
        self.types = self.s["dictionary"]["types"]["attributes"]
        self.by_uid = {}
        for name, c in self.s["events"].items():
            if "uid" in c and self.category(name) in CATEGORY_UIDS:
                uid = CATEGORY_UIDS[self.category(name)] * 1000 + c["uid"]
                self.by_uid[uid] = name

    def category(self, name):
        for d in reversed(self.chain("events", name)):
            if d.get("category"):
                return d["category"]
        return None

    def chain(self, table, name):
        """Definitions from the base to `name` (the `extends` chain)."""
        out = []
        while name:
            d = self.s[table][name]
            out.append(d)
            name = d.get("extends")
        return list(reversed(out))

    def attrs(self, table, name):
        merged, constraints = {}, {}
        for d in self.chain(table, name):
            for k, v in (d.get("attributes") or {}).items():
                if k == "$include":
                    continue
                if isinstance(v, dict):
                    merged.setdefault(k, {}).update(v)
            constraints.update(d.get("constraints") or {})
        return merged, constraints

    def attr_type(self, name, local):
        t = local.get("type") or self.dict.get(name, {}).get("type")
        is_array = local.get("is_array", self.dict.get(name, {}).get("is_array", False))
        return t, is_array

    def enum(self, name, local):
        return local.get("enum") or self.dict.get(name, {}).get("enum")


def observable_ids(sc):
    """Observable type ids: OCSF generates observable.type_id's enum from
    the `observable` numbers of types, attributes and objects."""
    ids = {"0", "99"}
    for table in (sc.types, sc.dict, sc.s["objects"]):
        for d in table.values():
            if isinstance(d, dict) and isinstance(d.get("observable"), int):
                ids.add(str(d["observable"]))
    return ids


def check_object(sc, table, name, value, path, errors, custom=False):
    if not isinstance(value, dict):
        errors.append(f"{path}: expected an object ({name}), got {value!r}")
        return
    attrs, constraints = sc.attrs(table, name)
    for req, d in attrs.items():
        if d.get("requirement") == "required" and req not in value:
            errors.append(f"{path}.{req}: required by {name}, missing")
    for group in constraints.get("at_least_one", []) and [constraints["at_least_one"]]:
        if not any(k in value for k in group):
            errors.append(f"{path}: {name} needs at least one of {group}")
    if "just_one" in constraints:
        n = sum(k in value for k in constraints["just_one"])
        if n != 1:
            errors.append(f"{path}: {name} needs exactly one of {constraints['just_one']}")
    for k, v in value.items():
        p = f"{path}.{k}"
        if path == "$" and k == "portcullis":
            continue
        if k not in attrs:
            errors.append(f"{p}: not an attribute of {name}")
            continue
        t, is_array = sc.attr_type(k, attrs[k])
        if k == "unmapped" or t in ("object_t", "json_t"):
            continue
        items = v if is_array else [v]
        if is_array and not isinstance(v, list):
            errors.append(f"{p}: expected an array")
            continue
        for i, item in enumerate(items):
            ip = f"{p}[{i}]" if is_array else p
            if t in SCALAR:
                ok = isinstance(item, SCALAR[t]) and not (
                    SCALAR[t] is int and isinstance(item, bool))
                if not ok:
                    errors.append(f"{ip}: expected {t}, got {item!r}")
                enum = sc.enum(k, attrs[k])
                if name == "observable" and k == "type_id":
                    enum = observable_ids(sc)
                if custom and path == "$" and k == "activity_id":
                    enum = None  # the extension class defines its own
                if enum and k.endswith("_id") and str(item) not in enum \
                        and k not in ("class_uid", "type_uid", "category_uid"):
                    errors.append(f"{ip}: {item!r} is not in the enum of {k} ({sorted(enum)})")
            elif t in sc.s["objects"]:
                check_object(sc, "objects", t, item, ip, errors)
            else:
                errors.append(f"{ip}: unknown type {t}")


def check_record(rec):
    errors = []
    version = rec.get("metadata", {}).get("version")
    sc = Schema(version)
    class_uid = rec.get("class_uid")
    custom = class_uid // 100000 == EXTENSION_UID if isinstance(class_uid, int) else False
    name = "base_event" if custom else sc.by_uid.get(class_uid)
    if name is None:
        return [f"class_uid {class_uid} is not an OCSF {version} class"]
    # Identifiers agree.
    if rec.get("type_uid") != class_uid * 100 + rec.get("activity_id", -1):
        errors.append("$.type_uid: not class_uid * 100 + activity_id")
    cat = sc.category(name)
    want_cat = (class_uid // 1000) % 100 if custom else CATEGORY_UIDS.get(cat)
    if rec.get("category_uid") != want_cat:
        errors.append(f"$.category_uid: {rec.get('category_uid')} but the class is in {want_cat}")
    if not custom:
        acts = sc.attrs("events", name)[0].get("activity_id", {}).get("enum", {})
        if str(rec.get("activity_id")) not in acts and rec.get("activity_id") not in (0, 99):
            errors.append(f"$.activity_id: {rec.get('activity_id')} not in {sorted(acts)}")
    check_object(sc, "events", name, rec, "$", errors, custom)
    # pydantic model validation (the concrete classes; pydantic-ocsf's
    # BaseEvent model cannot be built, so the extension class gets the
    # strict check above only).
    if custom:
        return errors
    import importlib
    mod = importlib.import_module("ocsf.v" + version.replace(".", "_") + ".events")
    model = getattr(mod, CLASS_MODELS[class_uid])
    body = {k: v for k, v in rec.items() if k != "portcullis"}
    try:
        model.model_validate(body)
    except Exception as e:  # pydantic.ValidationError
        errors.append(f"pydantic {model.__name__}: {e}")
    return errors


def main(files):
    n, bad = 0, 0
    for f in files:
        with open(f) as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                n += 1
                rec = json.loads(line)
                errs = check_record(rec)
                for e in errs:
                    bad += 1
                    print(f"{f}:{i}: class {rec.get('class_uid')}: {e}")
    if bad:
        print(f"{bad} problems in {n} records")
        return 1
    print(f"{n} records valid")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
