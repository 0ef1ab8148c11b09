#!/usr/bin/env python3
"""Splits rendered Kubernetes manifests for offline schema validation (run by scripts/check-k8s).

Built-in kinds are written to --builtin-out, for `kubernetes-validate --strict`, which has the
Kubernetes API's schemas. Custom resources (the Prometheus Operator's PodMonitor and
PrometheusRule) are not in those schemas: kubernetes-validate only warns "Couldn't find schema"
and passes them. So every object whose apiVersion and kind have a schema in --schemas
(`<group>_<version>_<Kind>.json`, written by hand, strict: closed objects) is validated here
instead, its metadata and label selectors against the Kubernetes definitions kubernetes-validate
ships for --kubernetes-version. A custom resource without such a schema is sent on to
kubernetes-validate, whose warning check-k8s turns into a failure: nothing passes unchecked.

Exit status: 0 when every custom resource validates, 1 otherwise (each failure is printed with
the object it concerns).
"""

import argparse
import json
import pathlib
import sys

import jsonschema
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource


def schema_file(schemas: pathlib.Path, obj: dict) -> pathlib.Path:
    api = str(obj.get("apiVersion", "")).replace("/", "_")
    return schemas / f"{api}_{obj.get('kind', '')}.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kubernetes-version", required=True, help="e.g. 1.32.0")
    ap.add_argument("--schemas", required=True, type=pathlib.Path, help="directory of custom resource schemas")
    ap.add_argument("--builtin-out", required=True, type=pathlib.Path, help="where to write the other objects")
    ap.add_argument("inputs", nargs="+", type=pathlib.Path)
    args = ap.parse_args()

    version = args.kubernetes_version.lstrip("v")
    try:
        definitions = schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    except Exception as e:  # noqa: BLE001 - any failure here means no schemas for that version
        print(f"FAIL kubernetes-validate has no strict schemas for Kubernetes {version}: {e}")
        return 1
    registry = Resource.from_contents(definitions) @ Registry()

    builtin = []
    failures = 0
    for path in args.inputs:
        for obj in yaml.safe_load_all(path.read_text()):
            if not obj:
                continue
            name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            schema_path = schema_file(args.schemas, obj)
            if not schema_path.exists():
                builtin.append(obj)
                continue
            schema = json.loads(schema_path.read_text())
            validator = jsonschema.Draft202012Validator(schema, registry=registry)
            errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
            if errors:
                failures += 1
                for e in errors:
                    where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
                    print(f"FAIL {path.name}: custom resource {name}: {where}: {e.message}")
            else:
                print(f"ok   {path.name}: custom resource {name} against {schema_path.name} (strict)")
    args.builtin_out.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
