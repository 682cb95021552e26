"""The pairs of a cohort (``deepreg batch``): read from a CSV table, one row per registration, or
made from one template and a glob of scans; each checked before any work starts.

A table's columns are :class:`~deepreglib.run.options.RegisterOptions` fields (``fixed``,
``moving``, ``fixed_labels``, ``moving_labels``, ``fixed_landmarks``, ``moving_landmarks``,
``fixed_mask``, ``moving_mask``, ``initial_transform``, ``weights``, ``preset``, ``method``,
``init``, ``refine``, ``device``, ``qa``, ``method_options`` ... whatever the dataclass holds;
``-`` may stand for ``_``), the CLI spellings ``no_qa`` / ``no_cpu_fallback`` / ``method_option``,
and an optional ``id``. An empty cell means "not given" (the batch's default, else the field's).
Relative paths are relative to the table's folder. ``out`` and ``threads`` are the batch's own
(``--out``, ``--threads``) and are refused as columns.

A pair's *fingerprint* is a hash of its options and of each input file's path, size and
modification time: a resumed batch skips a pair only when the finished output was made with the
same fingerprint (:mod:`deepreglib.run.batch`).
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from ..core.errors import BadInputError
from ..io.exchange import IMAGE_EXTENSIONS, suffix
from .load import LABEL_INPUTS, LANDMARK_INPUTS
from .options import RegisterOptions

#: fields set by ``deepreg batch`` itself, never by a column
BATCH_OWNED = ("out", "threads")
#: fields that name files (relative paths are relative to the table's folder)
PATH_FIELDS = ("fixed", "moving", *LABEL_INPUTS, *LANDMARK_INPUTS, "initial_transform", "weights")
#: CLI spellings accepted as columns: column -> (field, negate)
ALIASES = {"no_qa": ("qa", True), "no_cpu_fallback": ("cpu_fallback", True),
           "method_option": ("method_options", False)}
#: names a pair id may not take (the batch's own files in ``--out``)
RESERVED_IDS = ("batch.json", "summary.csv", "summary.png")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_TRUE, _FALSE = ("1", "true", "yes", "y", "on"), ("0", "false", "no", "n", "off")


@dataclass
class BatchPair:
    """One registration of a batch: its id (the output folder's name), where it came from, and
    the :class:`RegisterOptions` fields it sets (every path absolute; no ``out``, no ``threads``)."""

    id: str
    #: the table's line number (1: the header), or 0 for a pair made from a template
    line: int
    options: Dict[str, object]
    fingerprint: str = ""
    #: the table's cells as written (for batch.json and messages)
    cells: Dict[str, str] = field(default_factory=dict)

    def register_options(self, out: str, threads: Optional[int] = None) -> RegisterOptions:
        return RegisterOptions(out=out, threads=threads, **self.options)


def option_fields() -> Dict[str, object]:
    """Name -> type of every :class:`RegisterOptions` field a column may set."""
    hints = typing.get_type_hints(RegisterOptions)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(RegisterOptions)
            if f.name not in BATCH_OWNED}


def valid_columns() -> List[str]:
    return ["id", *option_fields(), *ALIASES]


def column_field(column: str) -> str:
    """A header cell -> the column's normalised name (``--Fixed-Labels`` -> ``fixed_labels``)."""
    return column.strip().lstrip("-").strip().lower().replace("-", "_")


def _base_type(tp):
    """``Optional[X]`` -> ``X``."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def parse_options_cell(text: str) -> Dict[str, object]:
    """Method options from a cell: a JSON object, or ``KEY=VALUE`` items separated by ``;``
    (VALUE read as JSON when it parses, as with ``--method-option``)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not a JSON object ({e})") from None
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    options: Dict[str, object] = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"needs KEY=VALUE items separated by ';', got {item!r}")
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            options[key.strip().replace("-", "_")] = value
    return options


def convert(name: str, tp, text: str):
    """A cell's text as the field's type (``int``, ``float``, ``bool``, ``dict``, ``str``)."""
    base = _base_type(tp)
    origin = typing.get_origin(base) or base
    if origin is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if origin is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected a whole number, got {text!r}") from None
    if origin is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if origin is dict:
        return parse_options_cell(text)
    return text.strip()


def _stem(path: str) -> str:
    name = Path(path).name
    ext = suffix(name, IMAGE_EXTENSIONS)
    return name[:len(name) - len(ext)] if ext else Path(name).stem or name


def safe_id(text: str) -> str:
    """``text`` as a folder name: characters other than letters, digits, ``.``, ``_`` and ``-``
    become ``_``; no leading dot (hidden folders are the batch's own); at most 100 characters."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-") or "pair"
    if not s[0].isalnum():
        s = "p" + s
    return s[:100]


def _unique(wanted: str, taken: set) -> str:
    candidate, n = wanted, 1
    while candidate.lower() in taken or candidate.lower() in RESERVED_IDS:
        n += 1
        candidate = f"{wanted[:95]}-{n}"
    taken.add(candidate.lower())
    return candidate


def fingerprint(options: Dict[str, object]) -> str:
    """A short hash of a pair's options and of each input file's path, size and modification
    time (what its result depends on; the thread count does not change it)."""
    files = {}
    for name in PATH_FIELDS:
        value = options.get(name)
        if value:
            try:
                st = Path(str(value)).stat()
                files[name] = [str(value), st.st_size, st.st_mtime_ns]
            except OSError:
                files[name] = [str(value), None, None]
    text = json.dumps({"options": options, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _absolute(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str((p if p.is_absolute() else base / p).resolve())


def _where(line: int) -> str:
    return f"row {line}" if line else "pair"


def _check_pairs(pairs: Sequence[BatchPair], source: str) -> None:
    """Choices and files checked for every pair at once (BadInputError lists all problems)."""
    from ..methods.presets import get_preset
    from ..methods.registry import method_names
    from .initializers import init_choices
    from .options import apply_preset, check_contrast
    problems: List[str] = []
    methods, inits = method_names(), init_choices()
    for p in pairs:
        o = p.options
        try:
            if o.get("preset"):
                get_preset(str(o["preset"]))
            if o.get("method") and o["method"] not in methods:
                raise BadInputError(f"unknown method {o['method']!r} (one of {', '.join(methods)})")
            if o.get("init") and o["init"] not in inits:
                raise BadInputError(f"unknown init {o['init']!r} (one of {', '.join(inits)})")
            if int(o.get("refine") or 0) < 0:
                raise BadInputError(f"refine must be >= 0, got {o['refine']}")
            if o.get("contrast"):
                check_contrast(str(o["contrast"]))
            apply_preset(p.register_options(out="-"))
        except BadInputError as e:
            problems.append(f"{_where(p.line)} ({p.id}): {e}")
        for name in PATH_FIELDS:
            value = o.get(name)
            if value and not Path(str(value)).exists():
                shown = p.cells.get(name) or value
                problems.append(f"{_where(p.line)} ({p.id}): {name} file {shown!r} does not exist "
                                f"(looked for {value})")
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise BadInputError(f"{source}: {len(problems)} problem(s) before any registration started:\n  "
                            + "\n  ".join(problems[:12]) + more)


def _merge(defaults: Dict[str, object], own: Dict[str, object]) -> Dict[str, object]:
    options = dict(defaults)
    options.update(own)
    method_options = dict(defaults.get("method_options") or {})
    method_options.update(own.get("method_options") or {})
    options["method_options"] = method_options
    return options


def check_defaults(defaults: Dict[str, object]) -> None:
    """The batch-wide options (``--method``, ``--set``...) name fields a pair may set."""
    valid = option_fields()
    unknown = sorted(set(defaults) - set(valid))
    if unknown:
        raise BadInputError(f"unknown option(s) {', '.join(unknown)}; options a batch may set: "
                            f"{', '.join(valid)}")


def read_pairs_csv(path, defaults: Optional[Dict[str, object]] = None) -> List[BatchPair]:
    """The pairs of a CSV table (columns: module docstring); ``defaults`` are the batch's
    options, which a cell overrides. Every pair is checked (:func:`_check_pairs`).

    Raises:
        BadInputError: a missing or unknown column (the message names it and the valid ones), a
            cell of the wrong type, duplicate ids, an unknown method/preset/init/contrast, a missing file.
    """
    table = Path(path)
    if not table.is_file():
        raise BadInputError(f"pairs table {table} does not exist")
    defaults = dict(defaults or {})
    check_defaults(defaults)
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BadInputError(f"cannot read the pairs table {table}: {e}") from None
    rows = [r for r in rows if any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    if not rows:
        raise BadInputError(f"pairs table {table} is empty; it needs a header row (fixed,moving,...) "
                            "and one row per registration")
    header = _read_header(rows[0], table)
    pairs: List[BatchPair] = []
    explicit: Dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        cells, own = _read_row(row, line, header, table)
        pid = _explicit_id(cells, line, explicit, table)
        pairs.append(BatchPair(id=pid, line=line, options=_merge(defaults, own), cells=cells))
    if not pairs:
        raise BadInputError(f"pairs table {table} has a header but no rows")
    taken = set(explicit)
    for p in pairs:
        if not p.id:
            p.id = _unique(safe_id(f"{_stem(str(p.options['moving']))}_to_{_stem(str(p.options['fixed']))}"),
                           taken)
    _check_pairs(pairs, str(table))
    for p in pairs:
        p.fingerprint = fingerprint(p.options)
    return pairs


def _read_header(raw_header: List[str], table: Path) -> List[str]:
    """The header's option names; an unknown, batch-owned, repeated or missing column is an error."""
    header = [column_field(c) for c in raw_header]
    columns = valid_columns()
    for raw, name in zip(raw_header, header):
        if name in BATCH_OWNED:
            raise BadInputError(f"{table}: column {raw.strip()!r} is set by deepreg batch itself "
                                f"(--{name}), not per pair; remove the column")
        if name not in columns:
            raise BadInputError(f"{table}: unknown column {raw.strip()!r}; valid columns: "
                                f"{', '.join(columns)}")
    duplicated = sorted({n for n in header if header.count(n) > 1})
    if duplicated:
        raise BadInputError(f"{table}: column(s) {', '.join(duplicated)} appear more than once")
    for required in ("fixed", "moving"):
        if required not in header:
            raise BadInputError(f"{table}: missing column {required!r}; a table needs at least "
                                f"'fixed' and 'moving' (header read: {', '.join(raw_header)})")
    return header


def _read_row(row: List[str], line: int, header: List[str], table: Path):
    """``(cells, options)`` of one row: the non-empty cells by column, and their typed values by
    option name (paths made absolute against the table's folder)."""
    if len(row) > len(header) and any(c.strip() for c in row[len(header):]):
        raise BadInputError(f"{table}: row {line} has {len(row)} cells, the header {len(header)}")
    fields_ = option_fields()
    base = table.resolve().parent
    cells = {name: value for name, value in zip(header, row) if value.strip()}
    own: Dict[str, object] = {}
    for name, text in cells.items():
        if name == "id":
            continue
        target, negate = ALIASES.get(name, (name, False))
        try:
            value = convert(target, fields_[target], text)
        except ValueError as e:
            raise BadInputError(f"{table}: row {line}, column {name!r}: {e}") from None
        if negate:
            value = not value
        if target in PATH_FIELDS:
            value = _absolute(str(value), base)
        own[target] = value
    for required in ("fixed", "moving"):
        if required not in own:
            raise BadInputError(f"{table}: row {line} has no {required!r} file")
    return cells, own


def _explicit_id(cells: Dict[str, str], line: int, explicit: Dict[str, int], table: Path) -> str:
    """The row's own ``id`` (``""`` when none), checked as a folder name and unique (case-blind,
    as on Windows and macOS); recorded in ``explicit``."""
    pid = cells.get("id", "").strip()
    if not pid:
        return ""
    if not _SAFE_ID.match(pid) or pid.lower() in RESERVED_IDS:
        raise BadInputError(f"{table}: row {line}: id {pid!r} cannot name a folder; use letters, "
                            "digits, '.', '_' and '-' (not starting with '.'), at most 100, "
                            f"and none of {', '.join(RESERVED_IDS)}")
    if pid.lower() in explicit:
        raise BadInputError(f"{table}: id {pid!r} is on rows {explicit[pid.lower()]} and {line}; "
                            "ids must be unique")
    explicit[pid.lower()] = line
    return pid


def template_pairs(template, moving_glob: str, defaults: Optional[Dict[str, object]] = None,
                   fixed_labels: Optional[str] = None, moving_labels: Optional[str] = None,
                   base: Optional[Path] = None) -> List[BatchPair]:
    """Every scan matching ``moving_glob`` registered to one ``template`` (the scan itself
    skipped if it matches). ``moving_labels`` is a pattern per scan: ``{stem}`` (the file name
    without its image extension), ``{name}`` (the file name) and ``{dir}`` (its folder), e.g.
    ``'labels/{stem}_seg.nii.gz'``. Relative paths and the glob start at ``base`` (the current
    folder). Pair ids are the scans' stems (made unique)."""
    base = Path(base or Path.cwd())
    defaults = dict(defaults or {})
    check_defaults(defaults)
    pattern = moving_glob if Path(moving_glob).expanduser().is_absolute() else str(base / moving_glob)
    fixed = _absolute(str(template), base)
    scans = sorted(str(Path(p).resolve()) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True))
    scans = [s for s in scans if s != fixed]
    if not scans:
        raise BadInputError(f"--moving-glob {moving_glob!r} matches no scan (looked in {base})")
    taken: set = set()
    pairs = []
    for scan in scans:
        own: Dict[str, object] = {"fixed": fixed, "moving": scan}
        cells = {"fixed": str(template), "moving": scan}
        if fixed_labels:
            own["fixed_labels"] = _absolute(fixed_labels, base)
        if moving_labels:
            try:
                label = moving_labels.format(stem=_stem(scan), name=Path(scan).name, dir=str(Path(scan).parent))
            except (KeyError, IndexError, ValueError) as e:
                raise BadInputError(f"--moving-labels pattern {moving_labels!r}: use {{stem}}, {{name}} "
                                    f"and {{dir}} only ({e})") from None
            own["moving_labels"] = _absolute(label, base)
            cells["moving_labels"] = label
        pairs.append(BatchPair(id=_unique(safe_id(_stem(scan)), taken), line=0,
                               options=_merge(defaults, own), cells=cells))
    _check_pairs(pairs, f"--template {template} --moving-glob {moving_glob}")
    for p in pairs:
        p.fingerprint = fingerprint(p.options)
    return pairs


def options_from_items(items: Iterable[str]) -> Dict[str, object]:
    """``--set FIELD=VALUE`` items -> options, each VALUE converted as its column would be."""
    fields_ = option_fields()
    out: Dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        name = column_field(key)
        target, negate = ALIASES.get(name, (name, False))
        if not sep or target not in fields_:
            raise BadInputError(f"--set needs FIELD=VALUE with FIELD one of {', '.join(fields_)}; got {item!r}")
        try:
            value = convert(target, fields_[target], text)
        except ValueError as e:
            raise BadInputError(f"--set {item}: {e}") from None
        if target in PATH_FIELDS:
            value = _absolute(str(value), Path.cwd())
        out[target] = (not value) if negate else value
    return out

