"""Files and datasets → examples: reading, shape detection, validation, splitting.

A table of examples comes in one of these shapes (checked in this order):

- ``template``          the user gave a template such as ``"Q: {question}\\nA: {answer}"``; the
                        response is its last placeholder and must end it. Rendered as plain text.
- ``messages``          a ``messages`` column of chat turns [{role, content}, ...].
- ``prompt_completion`` ``prompt`` and ``completion`` columns.
- ``alpaca``            ``instruction`` (+ optional ``input``) and ``output`` columns.
- ``two_column``        exactly two columns: the first is the input, the second the response.
- ``columns``           the user named the response column of a wider table; every other column
                        becomes a ``name: {name}`` line of the prompt.

The trap: the tutorial table has columns ``act,prompt`` where ``prompt`` is the *response* (the
role-play text written for the act). A rule like "a column called prompt is the prompt" would train
the model backwards, so ``prompt`` means input only when a ``completion`` column sits beside it.

Every user-caused problem raises HabitError with one line naming the file, the line or row, and the
field. Nothing here imports torch or transformers: data is checked before any model loads.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from habit.errors import HabitError

SHAPES = ("template", "messages", "prompt_completion", "alpaca", "two_column", "columns")
ROLES = ("system", "user", "assistant")
SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
# save_to_disk writes state.json + dataset_info.json for a Dataset, dataset_dict.json for a DatasetDict.
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Example:
    """One training example.

    ``fields`` holds only the fields the prompt format uses, with the response field LAST (that is
    how ``prompt_key`` tells the prompt side from the answer without the table). Treat it as
    read-only; it stays a plain dict so examples pickle into worker processes.
    """

    fields: Mapping[str, str]
    messages: tuple[Message, ...] = ()  # chat examples only
    where: str = ""  # "path:LINE" or "path:row N", for later error messages


@dataclass(frozen=True)
class Table:
    source: str  # the path or dataset name as given
    shape: str  # one of SHAPES
    columns: tuple[str, ...]  # column names in file order
    prompt_format: str | None  # str.format text with {field} placeholders; None for "messages"
    response: str | None  # the field holding the response; None for "messages"
    text_template: bool  # the user gave a template: render as plain text, never a chat template
    examples: tuple[Example, ...]
    duplicates: int  # exact duplicate examples dropped (first kept)
    sha256: str  # of the file bytes; of a directory's files; of a hub name + its rows


@dataclass(frozen=True)
class _Raw:
    """Rows as read, before shape detection: each row is (where, {column: value})."""

    columns: tuple[str, ...]
    rows: list[tuple[str, dict[str, Any]]]
    sha256: str
    hint: str = ""  # appended to missing-column errors, e.g. a delimiter suspicion


def _error(message: str) -> HabitError:
    # User text (column names, roles) can hold newlines; the CLI promises one line.
    return HabitError(message.replace("\r", "\\r").replace("\n", "\\n"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", tuple: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- format strings


def placeholders(fmt: str) -> list[str]:
    """Field names in a str.format string, in order of first appearance.

    Only bare ``{name}`` is allowed: positional ``{}``/``{0}``, ``{a.b}``/``{a[0]}``, conversions
    and format specs are rejected, because the response is appended verbatim and a template should
    mean exactly what it shows.
    """
    names: list[str] = []
    try:
        parts = list(string.Formatter().parse(fmt))
    except ValueError as e:
        raise _error(f"template {fmt!r}: {e} (write {{{{ and }}}} for literal braces)") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise _error(f"template {fmt!r}: positional placeholder {{{name}}}; name a field like {{prompt}}")
        if "." in name or "[" in name:
            raise _error(f"template {fmt!r}: {{{name}}} uses attribute or index access; not supported")
        if spec or conversion:
            raw = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise _error(f"template {fmt!r}: {raw} is not a plain {{field}} placeholder (no conversions or "
                         f"format specs; write {{{{ and }}}} for literal braces)")
        if name not in names:
            names.append(name)
    return names


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _ref(source: str, column: str) -> str:
    """A ``{column}`` placeholder, refusing names str.format would misread (``a.b``, ``0``, ``{``)."""
    try:
        if placeholders("{" + column + "}") == [column]:
            return "{" + column + "}"
    except HabitError:
        pass
    raise _error(f"{source}: column name {column!r} cannot be used as a field; rename it")


# ---------------------------------------------------------------- reading


def _decode(name: str, data: bytes) -> str:
    if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        raise _error(f"{name}: file is UTF-16 encoded; save it as UTF-8")
    if b"\x00" in data[:8192]:
        raise _error(f"{name}: looks like a binary file, not CSV/TSV/JSON/JSONL")
    data = data.removeprefix(codecs.BOM_UTF8)  # Excel writes one; it is not part of the first column name
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _error(f"{name}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None


def _read_csv(name: str, text: str, delimiter: str) -> tuple[tuple[str, ...], list, str]:
    """Returns (header, rows, hint); each row is ("path:LINE", {column: text})."""
    # Long documents in one cell are normal for LLM data; the csv default limit is 128 KiB.
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows = []
    line = 1  # physical line where the next record starts (a quoted cell may span lines)
    try:
        for record in reader:
            start, line = line, reader.line_num + 1
            if not record:  # blank line
                continue
            if header is None:
                header = [h.strip() for h in record]
                for i, h in enumerate(header):
                    if not h:
                        raise _error(f"{name}:{start}: column {i + 1} of the header has no name")
                    if header.index(h) != i:
                        raise _error(f"{name}:{start}: column {h!r} appears twice in the header")
                continue
            if len(record) != len(header):
                # A quote left open swallows the lines after it into one short record.
                hint = " (an unclosed quote?)" if reader.line_num > start and len(record) < len(header) else ""
                raise _error(f"{name}:{start}: found {len(record)} field(s) but the header has "
                             f"{len(header)}{hint}")
            rows.append((f"{name}:{start}", dict(zip(header, record))))
    except csv.Error as e:
        raise _error(f"{name}:{line}: malformed CSV ({e})") from None
    if header is None:
        raise _error(f"{name}: file is empty")
    if not rows:
        raise _error(f"{name}: no rows (header only)")
    hint = ""
    if len(header) == 1 and any(c in header[0] for c in ",;\t|" if c != delimiter):
        hint = f" (only one column found; is the delimiter {delimiter!r}?)"
    return tuple(header), rows, hint


def _read_jsonl(name: str, text: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _error(f"{name}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise _error(f"{name}:{number}: malformed JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise _error(f"{name}:{number}: expected a JSON object, found {_kind(obj)}")
        rows.append((f"{name}:{number}", obj))
    return rows


def _read_json(name: str, text: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; one object per line? name the file .jsonl" if e.msg == "Extra data" else ""
        raise _error(f"{name}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}{hint})") from None
    except RecursionError:
        raise _error(f"{name}: malformed JSON (nested too deeply)") from None
    if not isinstance(data, list):
        raise _error(f"{name}: expected a JSON array of objects at the top level, found {_kind(data)}")
    for i, obj in enumerate(data, 1):
        if not isinstance(obj, dict):
            raise _error(f"{name}:row {i}: expected a JSON object, found {_kind(obj)}")
    return _numbered(name, data)


def _numbered(name: str, records: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{name}:row {i}", r) for i, r in enumerate(records, 1)]


def _read_parquet(name: str, path: Path, sha: str) -> _Raw:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _error(f"{name}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises many types for a damaged file; all mean "bad input"
        raise _error(f"{name}: cannot read Parquet ({_first_line(e)})") from None
    return _Raw(tuple(table.column_names), _numbered(name, table.to_pylist()), sha)


def _import_datasets(name: str):
    try:
        import datasets
    except ImportError:
        raise _error(f"{name}: loading a saved or hub dataset needs the 'datasets' package") from None
    return datasets


def _read_saved_dataset(name: str, path: Path) -> _Raw:
    if not any((path / m).is_file() for m in _SAVED_DATASET_MARKERS):
        raise _error(f"{name}: is a directory but not a saved dataset (no dataset_info.json or "
                     f"state.json); pass a {', '.join(SUFFIXES)} file")
    datasets = _import_datasets(name)
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # a half-written or incompatible save; report it as bad input
        raise _error(f"{name}: cannot load saved dataset ({_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise _error(f"{name}: saved dataset has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file.read_bytes())
    return _Raw(tuple(ds.column_names), _numbered(name, ds.to_list()), digest.hexdigest())


def _read_hub(name: str) -> _Raw:
    datasets = _import_datasets(name)
    try:
        ds = datasets.load_dataset(name, split="train")
        rows = ds.to_list()
    except Exception as e:  # offline, gated, missing, no train split: all mean "use a local file"
        raise _error(f"cannot load dataset {name!r} from the hub ({_first_line(e)}): "
                     "pass a local file instead") from None
    digest = hashlib.sha256(name.encode() + b"\0")
    digest.update(json.dumps(rows, sort_keys=True, default=str).encode())
    return _Raw(tuple(ds.column_names), _numbered(name, rows), digest.hexdigest())


def _read_file(name: str, path: Path) -> _Raw:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise _error(f"{name}: unsupported file type {suffix or '(none)'!r}; "
                     f"use one of {', '.join(SUFFIXES)}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _error(f"{name}: cannot read ({e.strerror})") from None
    sha = hashlib.sha256(data).hexdigest()
    if suffix == ".parquet":
        if not data:
            raise _error(f"{name}: file is empty")
        return _read_parquet(name, path, sha)
    text = _decode(name, data)
    if not text.strip():
        raise _error(f"{name}: file is empty")
    if suffix in (".csv", ".tsv"):
        header, rows, hint = _read_csv(name, text, "," if suffix == ".csv" else "\t")
        return _Raw(header, rows, sha, hint)
    rows = _read_jsonl(name, text) if suffix == ".jsonl" else _read_json(name, text)
    columns: dict[str, None] = {}  # JSON rows may differ in keys: take the union, in first-seen order
    for _, row in rows:
        columns.update(dict.fromkeys(row))
    return _Raw(tuple(columns), rows, sha)


def _read(source: str | os.PathLike) -> _Raw:
    name = os.fspath(source)
    path = Path(name)
    if path.is_dir():
        raw = _read_saved_dataset(name, path)
    elif path.exists():
        raw = _read_file(name, path)
    elif isinstance(source, str) and _HUB_NAME.fullmatch(source) and path.suffix.lower() not in SUFFIXES:
        raw = _read_hub(source)
    else:
        raise _error(f"{name}: no such file")
    if not raw.rows:
        raise _error(f"{name}: no rows")
    return raw


# ---------------------------------------------------------------- shapes

_Shape = tuple[str, str | None, str | None]  # (shape, prompt_format, response)


def _split_template(name: str, raw: _Raw, template: str, response: str | None) -> tuple[str, str]:
    """Split a template into the prompt format and the response field that must end it."""
    fields = placeholders(template)
    if not fields:
        raise _error(f"{name}: template has no {{field}} placeholders")
    for field in fields:
        if field not in raw.columns:
            raise _error(f"{name}: template field {field!r} is not a column "
                         f"(columns: {', '.join(raw.columns)}){raw.hint}")
    parts = list(string.Formatter().parse(template))
    response = response if response is not None else [p[1] for p in parts if p[1] is not None][-1]
    at = [i for i, p in enumerate(parts) if p[1] == response]
    if not at:
        raise _error(f"{name}: response field {response!r} does not appear in the template")
    if len(at) > 1:
        raise _error(f"{name}: response field {{{response}}} appears twice in the template; "
                     "the prompt would contain the answer")
    after = parts[at[0] + 1:]
    if any(p[1] is not None for p in after) or "".join(p[0] for p in after).strip():
        raise _error(f"{name}: the response placeholder {{{response}}} must end the template "
                     "(only whitespace may follow it): the model learns to write what follows the prompt")
    prompt = "".join(_escape(lit) + (f"{{{field}}}" if field else "") for lit, field, _, _ in parts[:at[0]])
    return prompt + _escape(parts[at[0]][0]), response


def _guess(name: str, columns: tuple[str, ...], response: str | None) -> _Shape | None:
    if "messages" in columns:
        return "messages", None, None
    # `prompt` is an input ONLY next to `completion`: in act,prompt tables it is the response.
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion", "{prompt}", "completion"
    if "instruction" in columns and "output" in columns:
        return "alpaca", "{instruction}\n\n{input}" if "input" in columns else "{instruction}", "output"
    if len(columns) == 2 and response in (None, columns[1]):
        return "two_column", _ref(name, columns[0]), columns[1]
    return None


def _detect(name: str, raw: _Raw, template: str | None, response: str | None) -> _Shape:
    """(shape, prompt_format, response) by the rules in the module docstring, in that order."""
    if template is not None:
        return ("template", *_split_template(name, raw, template, response))
    guessed = _guess(name, raw.columns, response)
    if response is None:
        if guessed is None:
            raise _error(f"{name}: cannot tell which column is the response (columns: "
                         f"{', '.join(raw.columns)}); pass --template or --response{raw.hint}")
        return guessed
    if response not in raw.columns:
        raise _error(f"{name}: response field {response!r} is not a column "
                     f"(columns: {', '.join(raw.columns)}){raw.hint}")
    if guessed is not None and guessed[2] == response:
        return guessed
    others = [c for c in raw.columns if c != response]  # an explicit choice beats the guess
    if not others:
        raise _error(f"{name}: response field {response!r} is the only column; nothing to prompt with")
    if len(others) == 1:
        return "two_column", _ref(name, others[0]), response
    return "columns", "".join(f"{_escape(c)}: {_ref(name, c)}\n" for c in others), response


# ---------------------------------------------------------------- rows → examples


def _text(where: str, row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        raise _error(f"{where}: field {field!r} is missing")
    if isinstance(value, (list, tuple, dict, bytes, bytearray)):
        raise _error(f"{where}: field {field!r} holds {_kind(value)}, not text")
    return value if isinstance(value, str) else str(value)


def _messages(where: str, value: Any) -> tuple[Message, ...]:
    if value is None:
        raise _error(f"{where}: field 'messages' is missing")
    if isinstance(value, str):  # CSV cells (and some exports) carry the list as JSON text
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise _error(f"{where}: field 'messages' is not valid JSON ({_first_line(e)})") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise _error(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    turns_from = 1 if isinstance(value[0], dict) and value[0].get("role") == "system" else 0
    out = []
    for i, m in enumerate(value):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise _error(f"{at} must be an object with 'role' and 'content', found {_kind(m)}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise _error(f"{at}.role must be a string")
        if role not in ROLES:
            raise _error(f"{at}.role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _error(f"{at}.content must be a string")
        if i >= turns_from:  # an optional system message, then user/assistant strictly alternating
            expected = ("user", "assistant")[(i - turns_from) % 2]
            if role != expected:
                raise _error(f"{at}.role is {role!r} but {expected!r} was expected")
        out.append(Message(role, content))
    last = len(out) - 1
    if out[-1].role != "assistant":
        raise _error(f"{where}: messages[{last}].role is {out[-1].role!r} "
                     "but the last message must be 'assistant'")
    if not out[-1].content.strip():
        raise _error(f"{where}: messages[{last}].content is empty")
    return tuple(out)


def load_examples(
    source: str | os.PathLike, template: str | None = None, response: str | None = None
) -> Table:
    """Read a table of examples from a file, a saved dataset directory or a hub dataset name.

    ``source``: .csv, .tsv, .json (array of objects), .jsonl, .parquet, a ``save_to_disk``
    directory, or ``owner/name`` on the Hugging Face hub. ``template``: a text template whose last
    placeholder is the response, e.g. ``"Act: {act}\\n{prompt}"``. ``response``: the response column
    when the shape cannot be guessed. Exact duplicate examples are dropped (first kept).
    """
    name = os.fspath(source)
    raw = _read(source)
    shape, prompt_format, response = _detect(name, raw, template, response)
    fields, required = [], set()
    if prompt_format is not None:
        fields = [f for f in placeholders(prompt_format) if f != response] + [response]
        # An empty input is fine (alpaca rows often have none); an empty answer teaches nothing.
        required = {response, "instruction"} if shape == "alpaca" else {response}
    examples: list[Example] = []
    seen: set[tuple] = set()
    for where, row in raw.rows:
        if prompt_format is None:
            example = Example(fields={}, messages=_messages(where, row.get("messages")), where=where)
            key: tuple = tuple(example.messages)
        else:
            values = {f: _text(where, row, f) for f in fields}
            for f in fields:
                if f in required and not values[f].strip():
                    raise _error(f"{where}: field {f!r} is empty")
            example = Example(fields=values, where=where)
            key = tuple(values.values())
        if key not in seen:
            seen.add(key)
            examples.append(example)
    return Table(source=name, shape=shape, columns=raw.columns, prompt_format=prompt_format,
                 response=response, text_template=shape == "template", examples=tuple(examples),
                 duplicates=len(raw.rows) - len(examples), sha256=raw.sha256)


# ---------------------------------------------------------------- splitting


def prompt_key(example: Example) -> str:
    """Stable text of the prompt side: every field but the response (last), or every message but
    the final assistant one. Examples with the same prompt share a key, so they split together."""
    if example.messages:
        turns = example.messages
        if turns[-1].role == "assistant":
            turns = turns[:-1]
        return json.dumps([[m.role, m.content] for m in turns], ensure_ascii=False)
    return json.dumps(list(example.fields.items())[:-1], ensure_ascii=False)


def _fraction(seed: int, example: Example) -> float:
    digest = hashlib.sha256(f"{seed}:{prompt_key(example)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(table: Table, val_frac: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Split into (train, val) by a hash of each prompt, not by position: the same prompt lands on
    the same side whatever the file order, and adding rows does not move old ones across.

    With val_frac > 0 and at least two examples, neither side is empty. File order is kept.
    """
    if not 0 <= val_frac <= 0.9:
        raise _error(f"val_frac must be between 0 and 0.9 (got {val_frac})")
    examples = table.examples
    scores = [_fraction(seed, ex) for ex in examples]
    in_val = [s < val_frac for s in scores]
    if val_frac > 0 and len(examples) >= 2:
        # Small tables can hash all to one side; move the nearest example across.
        if not any(in_val):
            in_val[min(range(len(scores)), key=scores.__getitem__)] = True
        elif all(in_val):
            in_val[max(range(len(scores)), key=scores.__getitem__)] = False
    train = [ex for ex, v in zip(examples, in_val) if not v]
    val = [ex for ex, v in zip(examples, in_val) if v]
    return train, val


# ---------------------------------------------------------------- preference data


@dataclass(frozen=True)
class Preference:
    """One preference record: a prompt with a chosen and a rejected answer (DPO, SimPO, ORPO), or
    with one answer and a label saying whether it is desirable (KTO: `rejected` is None).

    Each side is an ordinary Example (prompt + that answer), so it renders, masks and ends with EOS
    exactly as SFT examples do."""

    chosen: Example  # for KTO: the one answer, whatever its label
    rejected: Example | None
    label: bool | None = None  # KTO only
    where: str = ""


@dataclass(frozen=True)
class PreferenceTable:
    source: str
    shape: str  # "pairs" | "unpaired"
    text: bool  # prompts and answers are strings (else chat messages)
    records: tuple[Preference, ...]
    duplicates: int
    sha256: str


_LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}  # ints 1/0 hit True/False


def _json_messages(value: Any) -> Any:
    """A CSV cell (or a JSON string) holding a message list as JSON text → the list; else as is."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return value
        if isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed):
            return parsed
    return value


def _side(where: str, row: Mapping[str, Any], field: str, prompt: Any) -> Example:
    """prompt + one answer as an Example: text fields, or a chat whose last turn is the answer."""
    answer = row.get(field)
    if answer is None:
        raise _error(f"{where}: field {field!r} is missing")
    if isinstance(prompt, str) and isinstance(answer, str):
        if not answer.strip():
            raise _error(f"{where}: field {field!r} is empty")
        return Example(fields={"prompt": prompt, "completion": answer}, where=where)
    turns = prompt if isinstance(prompt, (list, tuple)) else [{"role": "user", "content": prompt}]
    if isinstance(answer, str):
        answer = [{"role": "assistant", "content": answer}]
    if not isinstance(answer, (list, tuple)):
        raise _error(f"{where}: field {field!r} holds {_kind(answer)}; expected text or a list of messages")
    messages = _messages(f"{where} ({field})", list(turns) + list(answer))
    return Example(fields={}, messages=messages, where=where)


def load_preferences(source: str | os.PathLike) -> PreferenceTable:
    """Read preference data: `prompt`, `chosen`, `rejected` columns (pairs), or `prompt`,
    `completion`, `label` (unpaired, for KTO). Prompts and answers are strings or chat message
    lists (JSON text in CSV cells), in any format load_examples reads."""
    name = os.fspath(source)
    raw = _read(source)
    columns = set(raw.columns)
    if {"prompt", "chosen", "rejected"} <= columns:
        shape = "pairs"
    elif {"prompt", "completion", "label"} <= columns:
        shape = "unpaired"
    else:
        raise _error(f"{name}: preference data needs columns prompt, chosen, rejected (pairs) or "
                     f"prompt, completion, label (KTO); found {', '.join(raw.columns)}{raw.hint}")
    records: list[Preference] = []
    seen: set = set()
    for where, row in raw.rows:
        row = {k: _json_messages(v) for k, v in row.items()}
        prompt = row.get("prompt")
        if prompt is None:
            raise _error(f"{where}: field 'prompt' is missing")
        if not isinstance(prompt, (str, list, tuple)):
            raise _error(f"{where}: field 'prompt' holds {_kind(prompt)}; expected text or a list of messages")
        if isinstance(prompt, str) and not prompt.strip():
            raise _error(f"{where}: field 'prompt' is empty")
        if shape == "pairs":
            chosen, rejected = _side(where, row, "chosen", prompt), _side(where, row, "rejected", prompt)
            if chosen == rejected:
                raise _error(f"{where}: 'chosen' and 'rejected' are the same answer")
            record = Preference(chosen, rejected, where=where)
        else:
            label = row.get("label")
            key = label.strip().lower() if isinstance(label, str) else label
            if isinstance(key, float) and key in (0.0, 1.0):
                key = int(key)
            if not isinstance(key, (str, bool, int)) or key not in _LABELS:
                raise _error(f"{where}: field 'label' is {label!r}; expected true or false")
            record = Preference(_side(where, row, "completion", prompt), None, _LABELS[key], where)
        marker = repr([(tuple(e.fields.items()), e.messages) if e else None
                       for e in (record.chosen, record.rejected)] + [record.label])
        if marker not in seen:
            seen.add(marker)
            records.append(record)
    text = all(not r.chosen.messages for r in records)
    return PreferenceTable(name, shape, text, tuple(records), len(raw.rows) - len(records), raw.sha256)
