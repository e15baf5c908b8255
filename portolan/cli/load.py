"""``portolan load FILE.json``: import a starting state (CNs, VNICs, routes).

The document is handed to ``Directory.load``, which checks everything before it writes and
then writes it in one transaction: a refused file leaves the store as it was. Each problem is
printed as ``field: message`` with the field path inside the document (for example
``vnics[3].mac: invalid MAC address "zz"``). Exit codes: 0 loaded, 1 refused (bad file, bad
content, store failure), 2 bad arguments. A file that cannot be read or is not JSON is refused
before the store is opened.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

import trio

from portolan.cli.serve import DEFAULT_STORE
from portolan.errors import Conflict, InvalidParameters, PortolanError
from portolan.store import check_url, redact_url


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "load",
        help="import CNs, VNICs and routes from a JSON document (all or nothing)",
        description="Import a starting state from a JSON document. Everything is checked "
        "first; a refused document writes nothing. No shootdown log entries are written.",
    )
    p.add_argument("file", metavar="FILE.json", help="the document ('-' reads stdin)")
    p.add_argument(
        "--store",
        default=os.environ.get("PORTOLAN_STORE", DEFAULT_STORE),
        help=f"store URL (default {DEFAULT_STORE})",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def read_document(path: str) -> dict[str, Any]:
    """The parsed document; ValueError with an operator-facing sentence when it is unusable."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(doc, dict):
        raise ValueError(
            f"{path}: the document must be a JSON object with keys such as "
            f'"cns", "vnics", "routes", not a {type(doc).__name__}'
        )
    return doc


async def load_document(store: str, doc: dict[str, Any]) -> dict[str, Any]:
    from portolan.service import Directory

    directory = await Directory.open(store)
    try:
        return await directory.load(doc)
    finally:
        with trio.CancelScope(shield=True):
            await directory.aclose()


_MISSING = object()


def value_at(doc: Any, path: str) -> Any:
    """The value a field path such as ``vnics[3].mac`` names in ``doc`` (or a sentinel)."""
    node = doc
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            index = int(part[1:-1])
            if not isinstance(node, list) or index >= len(node):
                return _MISSING
            node = node[index]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return _MISSING
    return node


def field_line(doc: Any, field: str, message: str) -> str:
    """``vnics[3].mac: invalid MAC address "zz"``: the offending value is shown when the
    message does not already carry it."""
    value = value_at(doc, field)
    if value is _MISSING or isinstance(value, dict | list):
        return f"{field}: {message}"
    shown = json.dumps(value)
    if shown in message or repr(value) in message:
        return f"{field}: {message}"
    return f"{field}: {message} {shown}"


def _field_lines(doc: Any, exc: PortolanError) -> list[str]:
    errors = getattr(exc, "errors", None) or []
    return ["  " + field_line(doc, e.field, e.message) for e in errors]


def run(args: argparse.Namespace) -> int:
    try:
        check_url(args.store)
    except ValueError as exc:
        print(f"portolan load: --store: {exc}; nothing was written", file=sys.stderr)
        return 2
    try:
        doc = read_document(args.file)
    except ValueError as exc:
        print(f"portolan load: {exc}; nothing was written", file=sys.stderr)
        return 1
    try:
        summary = trio.run(load_document, args.store, doc)
    except (InvalidParameters, Conflict) as exc:
        lines = _field_lines(doc, exc)
        print(
            f"portolan load: {args.file} refused, nothing was written: {exc.message}",
            file=sys.stderr,
        )
        for line in lines:
            print(line, file=sys.stderr)
        return 1
    except PortolanError as exc:
        print(f"portolan load: {args.file} refused, nothing was written: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
    else:
        parts = ", ".join(f"{v} {k}" for k, v in summary.items()) if summary else "nothing"
        print(f"loaded {parts} from {args.file} into {redact_url(args.store)}")
    return 0
