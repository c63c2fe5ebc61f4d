"""Reading YAML files that may be hostile: bounded in size, depth, nodes and aliases.

:func:`load_yaml_file` is the one way charllm reads a campaign or cluster profile. Before
anything is built it

- reads at most :data:`MAX_BYTES` (1 MiB) and decodes strict UTF-8 (a bad byte is an error
  naming its line and column);
- walks the parser's event stream once and stops at the first event past a bound: nesting
  deeper than :data:`MAX_DEPTH`, more than :data:`MAX_ALIASES` aliases, more than
  :data:`MAX_NODES` nodes *counting each alias at the size of the node it repeats* (an alias
  bomb of a few hundred bytes expands to billions of nodes in whatever walks the result; here it
  is refused after a few dozen events), an alias inside the node it names (a cycle), more than
  one document, or a key given twice in one mapping (an error naming the key's path and both
  lines; PyYAML silently keeps the last);
- only then composes and constructs the data (PyYAML's safe constructors, libyaml when present).

Every refusal is a :class:`~charllm.errors.ConfigError` naming the file and the field (a
dotted path such as ``sweep.tp`` or ``include[3]``, or ``line L, column C``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from charllm.errors import ConfigError

MAX_BYTES = 1 << 20  # 1 MiB: the largest campaign shipped is 6 KiB
MAX_DEPTH = 32  # campaign files nest 4 deep
MAX_NODES = 200_000  # expanded: an alias counts as the node it repeats
MAX_ALIASES = 1_000

_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class BoundedLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """PyYAML's safe loader (libyaml when present); :func:`loads` checks the bounds before it runs."""


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(yaml)"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _short(path: str) -> str:
    """A field path for a message: a very deep one is cut in the middle."""
    return path if len(path) <= 120 else f"{path[:56]}...{path[-56:]}"


class _Frame:
    __slots__ = ("anchor", "count", "is_map", "key", "key_line", "keys", "path", "start_nodes")

    def __init__(self, is_map: bool, path: str, anchor: str | None, start_nodes: int) -> None:
        self.is_map = is_map
        self.path = path
        self.anchor = anchor
        self.start_nodes = start_nodes
        self.count = 0  # children seen (keys and values both count in a mapping)
        self.keys: dict[str, int] = {}
        self.key = "?"
        self.key_line = 0


def check_events(text: str, source: str) -> None:
    """Walk ``text``'s YAML events once; raise ConfigError at the first bound passed (see module doc)."""
    stack: list[_Frame] = []
    sizes: dict[str, int] = {}  # anchor -> expanded node count of the finished node it names
    open_anchors: set[str] = set()
    nodes = aliases = documents = 0

    def child_path() -> str:
        if not stack:
            return ""
        top = stack[-1]
        if top.is_map:
            return _join(top.path, top.key) if top.count % 2 else top.path
        return f"{top.path}[{top.count}]"

    def add(n: int, where: str, mark: Any) -> None:
        nonlocal nodes
        nodes += n
        if nodes > MAX_NODES:
            raise ConfigError(
                source,
                where or _where(mark),
                f"the document expands to more than {MAX_NODES} nodes (aliases counted at the size of "
                f"what they repeat; at {_where(mark)}): refused before building it",
            )

    def after_child() -> None:
        if stack:
            stack[-1].count += 1

    try:
        for ev in yaml.parse(text, Loader=BoundedLoader):
            if isinstance(ev, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise ConfigError(source, "(file)", "more than one YAML document in the file (a second '---')")
                continue
            if not isinstance(ev, yaml.NodeEvent | yaml.CollectionEndEvent):
                continue
            if isinstance(ev, yaml.CollectionEndEvent):
                frame = stack.pop()
                if frame.anchor is not None:
                    open_anchors.discard(frame.anchor)
                    sizes[frame.anchor] = nodes - frame.start_nodes
                after_child()
                continue
            where = child_path()
            top = stack[-1] if stack else None
            is_key = top is not None and top.is_map and top.count % 2 == 0
            if is_key and top is not None:
                if isinstance(ev, yaml.ScalarEvent):
                    key, line = ev.value, ev.start_mark.line + 1
                    if key != "<<" and key in top.keys:
                        raise ConfigError(
                            source,
                            _join(top.path, key),
                            f"duplicate key {key!r} at line {line} (first at line {top.keys[key]}); "
                            "YAML would silently keep the last one",
                        )
                    top.keys[key] = line
                    top.key = key
                else:
                    top.key = "?"
            if isinstance(ev, yaml.AliasEvent):
                aliases += 1
                if aliases > MAX_ALIASES:
                    raise ConfigError(
                        source, where or _where(ev.start_mark), f"more than {MAX_ALIASES} YAML aliases (*name)"
                    )
                if ev.anchor in open_anchors:
                    raise ConfigError(
                        source,
                        where or _where(ev.start_mark),
                        f"alias *{ev.anchor} at {_where(ev.start_mark)} refers to a node that contains it (a cycle)",
                    )
                if ev.anchor not in sizes:
                    raise ConfigError(
                        source, where or _where(ev.start_mark), f"alias *{ev.anchor} names no anchor defined before it"
                    )
                add(sizes[ev.anchor], where, ev.start_mark)
                after_child()
                continue
            add(1, where, ev.start_mark)
            if isinstance(ev, yaml.ScalarEvent):
                if ev.anchor is not None:
                    sizes[ev.anchor] = 1
                after_child()
                continue
            # a collection starts
            if len(stack) >= MAX_DEPTH:
                raise ConfigError(
                    source, _short(where) or _where(ev.start_mark), f"nested deeper than {MAX_DEPTH} levels"
                )
            frame = _Frame(isinstance(ev, yaml.MappingStartEvent), where, ev.anchor, nodes - 1)
            if ev.anchor is not None:
                open_anchors.add(ev.anchor)
                sizes.pop(ev.anchor, None)  # a redefined anchor: aliases after it see the new node
            stack.append(frame)
    except yaml.YAMLError as err:
        raise _syntax(source, err, text) from None


def _syntax(source: str, err: yaml.YAMLError, text: str = "") -> ConfigError:
    if isinstance(err, yaml.reader.ReaderError):  # a character YAML does not allow (control characters)
        pos = err.position
        line, col = text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1
        return ConfigError(source, f"line {line}, column {col}", f"character {err.character!r} is not allowed in YAML")
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return ConfigError(source, _where(mark), f"YAML syntax error: {problem}")


def loads(text: str, source: str) -> Any:
    """Parse one YAML document from ``text`` within the bounds; ``source`` names it in errors."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ConfigError(source, "(file)", f"larger than {MAX_BYTES} bytes; a campaign file is a few KiB")
    text = text.removeprefix("\ufeff")
    check_events(text, source)
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise _syntax(source, err, text) from None
    except Exception as err:  # PyYAML's constructors on odd input: a bad date, a 10,000-digit int, ...
        raise ConfigError(source, "(yaml)", f"cannot build the document: {type(err).__name__}: {err}") from None
    finally:
        loader.dispose()


def load_yaml_file(path: Path) -> Any:
    """Read ``path`` (at most :data:`MAX_BYTES`, strict UTF-8) and parse it with :func:`loads`."""
    src = str(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as err:
        raise ConfigError(src, "(file)", f"cannot read: {err.strerror or err}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(src, "(file)", f"larger than {MAX_BYTES} bytes; a campaign file is a few KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        col = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(
            src,
            f"line {line}, column {col}",
            f"not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start}; save the file as UTF-8",
        ) from None
    return loads(text, src)
