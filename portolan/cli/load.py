"""``portolan load FILE.json``: import a starting state (CNs, VNICs, routes).

The document is handed to ``Directory.load``, which checks everything before it writes and
then writes it in one transaction: a refused file leaves the store as it was. Each problem is
printed as ``field: message`` with the field path inside the document (for example
``vnics[3].mac: invalid MAC address "zz"``, ``cns[0].prot: unknown key``). Exit codes: 0
loaded, 1 refused (bad file, bad content, store failure), 2 bad arguments. A file that cannot
be read or is not JSON is refused before the store is opened; a refused load into a SQLite
file that did not exist before removes the file it created (no empty database is left).

Entries identical to the stored objects are left alone; entries that would change a stored
object are refused unless ``--replace`` is given, and then the shootdowns their moves need
are written (see ``Directory.load``). Documents of ``PROGRESS_MIN_ENTRIES`` entries or more
get progress lines on stderr (reading, checking, writing in batches, committing); every load
ends with one summary line on stdout (``--json``: the summary as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from portolan.cli.serve import DEFAULT_STORE
from portolan.errors import Conflict, InvalidParameters, PortolanError
from portolan.store import check_url, redact_url

#: documents with at least this many entries (CNs + VNICs + routes) get progress lines
PROGRESS_MIN_ENTRIES = 10_000


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
    p.add_argument(
        "--replace",
        action="store_true",
        help="replace stored CNs, VNICs and routes the document changes (without it such a "
        "document is refused); shootdowns are written for the moves",
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


async def load_document(
    store: str,
    doc: dict[str, Any],
    *,
    replace: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from portolan.service import Directory

    directory = await Directory.open(store)
    try:
        if progress is not None:
            progress("store opened; checking the document")
        return await directory.load(doc, replace_existing=replace, progress=progress)
    finally:
        with trio.CancelScope(shield=True):
            await directory.aclose()


def new_sqlite_files(store: str) -> list[Path]:
    """The files a SQLite store URL would create, if its database does not exist yet."""
    if not store.startswith("sqlite:"):
        return []
    path = store[len("sqlite:") :]
    path = path[2:] if path.startswith("//") else path
    main = Path(path)
    if main.exists():
        return []
    return [main] + [Path(f"{path}{suffix}") for suffix in ("-wal", "-shm", "-journal")]


def _remove(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            print(f"portolan load: cannot remove {p}: {exc.strerror or exc}", file=sys.stderr)


def _entries(doc: dict[str, Any]) -> int:
    return sum(len(v) for k in ("cns", "vnics", "routes") if isinstance(v := doc.get(k), list))


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def summary_line(summary: dict[str, Any], source: str, store: str) -> str:
    """``loaded 2 cns, 300,000 vnics and 0 routes from f.json into sqlite:p.db (version 7):
    300,000 new, 0 replaced, 2 unchanged``."""
    created = summary.get("created", {})
    replaced = summary.get("replaced", {})
    unchanged = summary.get("unchanged", {})
    what = (
        f"{_plural(summary.get('cns', 0), 'cn')}, {_plural(summary.get('vnics', 0), 'vnic')} and "
        f"{_plural(summary.get('routes', 0), 'route')}"
    )
    line = f"loaded {what} from {source} into {redact_url(store)}"
    if "version" in summary:
        line += f" (version {summary['version']})"
    if created or replaced or unchanged:
        line += (
            f": {sum(created.values()):,} new, {sum(replaced.values()):,} replaced, "
            f"{sum(unchanged.values()):,} unchanged"
        )
    shootdowns = summary.get("shootdowns", 0)
    if shootdowns:
        line += f"; {_plural(shootdowns, 'shootdown')} queued"
    return line


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
    started = time.monotonic()
    try:
        doc = read_document(args.file)
    except ValueError as exc:
        print(f"portolan load: {exc}; nothing was written", file=sys.stderr)
        return 1
    progress = None
    if _entries(doc) >= PROGRESS_MIN_ENTRIES:

        def progress(line: str) -> None:
            print(f"portolan load: {line} ({time.monotonic() - started:.1f} s)", file=sys.stderr)

        n = {
            k: len(v) if isinstance(v := doc.get(k), list) else 0
            for k in ("cns", "vnics", "routes")
        }
        progress(
            f"read {args.file}: {_plural(n['cns'], 'CN')}, {_plural(n['vnics'], 'VNIC')}, "
            f"{_plural(n['routes'], 'route')}"
        )
    created_files = new_sqlite_files(args.store)
    try:
        summary = trio.run(
            partial(load_document, replace=args.replace, progress=progress), args.store, doc
        )
    except (InvalidParameters, Conflict) as exc:
        _remove(created_files)
        lines = _field_lines(doc, exc)
        print(
            f"portolan load: {args.file} refused, nothing was written: {exc.message}",
            file=sys.stderr,
        )
        for line in lines:
            print(line, file=sys.stderr)
        return 1
    except PortolanError as exc:
        _remove(created_files)
        print(f"portolan load: {args.file} refused, nothing was written: {exc}", file=sys.stderr)
        return 1
    except Exception:
        _remove(created_files)  # e.g. the store failed: no half-made database either
        raise
    if progress is not None:
        progress("done")
    if args.json:
        print(json.dumps(summary))
    else:
        print(summary_line(summary, args.file, args.store))
    return 0
