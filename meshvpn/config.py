"""The node's TOML configuration: ``/etc/meshvpn/meshvpn.toml`` by default.

Theory of operation
-------------------
``tomllib`` parses (it is the standard library's, and strict), but it keeps
no positions, and neither does ``tomlkit`` (its items carry whitespace and
comments, not line numbers). So ``locate`` reads the text once more, only to
find where each key, table header and array element starts: it understands
comments, table headers, dotted and quoted keys, every string form (multi-line
included) and arrays and inline tables that span lines; values it skips.

``check`` then walks the parsed document against ``SCHEMA`` and returns every
problem, each with the file, the line and what was expected: an unknown key,
a wrong type, a value out of range or malformed (a bad CIDR, port, time
window, time zone). ``load`` is ``check`` that raises ``ConfigError`` on the
first problem and otherwise returns the converted values by dotted name
(``"sharing.price_per_gib"``). Everything here is pure but ``load_file``.

Precedence, applied by the CLI: a flag on the command line wins, then the
environment (``MESHVPN_STATE_DIR``, ``MESHVPN_WG_BACKEND``), then this file,
then the built-in default.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import tomllib
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from meshvpn.errors import ConfigError, LocalError

DEFAULT_CONFIG: Final = Path("/etc/meshvpn/meshvpn.toml")
CONFIG_ENV: Final = "MESHVPN_CONFIG"
GEOHASH_ALPHABET: Final = "0123456789bcdefghjkmnpqrstuvwxyz"
_IFNAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_HOURS_RE: Final = re.compile(r"(\d{2}):(\d{2})-(\d{2}):(\d{2})")
MAX_U64: Final = (1 << 64) - 1


class BadValueError(ValueError):
    """A value does not fit its key; the message says what was expected."""


# ---- value converters: each takes the parsed TOML value, returns the converted one


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # dates and times


def _expect(what: str, value: object) -> BadValueError:
    return BadValueError(f"expected {what}, got {_type_name(value)}")


def integer(lo: int = 0, hi: int = MAX_U64) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expect("an integer", value)
        if not lo <= value <= hi:
            raise BadValueError(f"expected an integer from {lo} to {hi}, got {value}")
        return value

    return convert


def positive_number(unit: str) -> Callable[[object], float]:
    def convert(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _expect(f"a number of {unit}", value)
        if not value > 0:
            raise BadValueError(
                f"expected a positive number of {unit} (leave the key out for none)"
            )
        return float(value)

    return convert


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _expect("true or false", value)
    return value


def string(value: object) -> str:
    if not isinstance(value, str):
        raise _expect("a string", value)
    return value


def choice(*options: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if string(value) not in options:
            raise BadValueError(f"expected one of {', '.join(map(repr, options))}, got {value!r}")
        return str(value)

    return convert


def path(value: object) -> str:
    if not string(value) or not str(value).startswith("/"):
        raise BadValueError(f"expected an absolute path, got {value!r}")
    return str(value)


def ifname(value: object) -> str:
    if not _IFNAME_RE.fullmatch(string(value)):
        raise BadValueError(
            f"expected an interface name (1-15 of A-Z a-z 0-9 _ . -), got {value!r}"
        )
    return str(value)


def host_port(value: object) -> str:
    text = string(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadValueError(f"expected host:port, e.g. 198.51.100.2:51820, got {text!r}")
    return text


def geohash(value: object) -> str:
    text = string(value)
    if len(text) > 12 or any(c not in GEOHASH_ALPHABET for c in text):
        raise BadValueError(f"expected a geohash (up to 12 of {GEOHASH_ALPHABET}), got {text!r}")
    return text


def network(value: object) -> str:
    """A CIDR; kept as text, parsed where it is used (IPv4 or IPv6)."""
    text = string(value)
    try:
        ipaddress.ip_network(text)
    except ValueError as exc:
        hint = ""
        with contextlib.suppress(ValueError):
            hint = f" (did you mean {ipaddress.ip_network(text, strict=False)}?)"
        raise BadValueError(
            f"expected a network in CIDR notation, e.g. 192.168.1.0/24, got {text!r}: {exc}{hint}"
        ) from None
    return text


def ipv4_network(value: object) -> str:
    text = network(value)
    if ipaddress.ip_network(text).version != 4:
        raise BadValueError(f"expected an IPv4 network, got {text!r}")
    return text


def ipv4_address(value: object) -> str:
    text = string(value)
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        raise BadValueError(f"expected an IPv4 address, got {text!r}") from None
    return text


def port_spec(value: object) -> str:
    text = string(value).strip().lower()
    proto, _, port = text.partition("/")
    if proto not in ("tcp", "udp") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadValueError(f"expected PROTO/PORT, e.g. tcp/25 or udp/5060, got {value!r}")
    return text


def hours_window(value: object) -> str:
    text = string(value)
    m = _HOURS_RE.fullmatch(text.replace(" ", ""))
    bad = BadValueError(f"expected a window HH:MM-HH:MM, e.g. 08:00-23:30, got {text!r}")
    if m is None:
        raise bad
    h1, m1, h2, m2 = map(int, m.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if h1 > 23 or m1 > 59 or m2 > 59 or end > 24 * 60 or start == end:
        raise bad
    return text.replace(" ", "")


def timezone(value: object) -> str:
    text = string(value)
    try:
        zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise BadValueError(
            f"expected an IANA time zone, e.g. Europe/Berlin or UTC, got {text!r}"
        ) from None
    return text


def listen_address(value: object) -> str:
    text = host_port(value)
    try:
        ipaddress.ip_address(text.rpartition(":")[0].strip("[]"))
    except ValueError:
        raise BadValueError(f"expected ADDR:PORT, e.g. 127.0.0.1:9810, got {text!r}") from None
    return text


class array_of:  # noqa: N801 - reads like the other converters
    """An array whose elements ``item`` converts; ``check`` reports each element's line."""

    def __init__(self, item: Callable[[object], Any]) -> None:
        self.item = item

    def __call__(self, value: object) -> list[Any]:
        if not isinstance(value, list):
            raise _expect("an array", value)
        return [self.item(v) for v in value]


# ---- the schema: table -> key -> converter. "" is the top level.

SCHEMA: Final[Mapping[str, Mapping[str, Callable[[object], Any]]]] = {
    "": {
        "state_dir": path,
        "broker": host_port,
        "interface": ifname,
        "wg_backend": choice("auto", "kernel", "userspace"),
    },
    "relay": {
        "listen_port": integer(1, 65535),
        "endpoint": host_port,
        "probe_port": integer(0, 65535),
        "geohash": geohash,
        "pool": ipv4_network,
        "announce_ttl": integer(3, 86_400),
        "metrics": listen_address,
    },
    "sharing": {
        "price_per_gib": integer(0, MAX_U64),
        "exit": boolean,
        "max_sessions": integer(0, 100_000),
        "bandwidth_mbit": positive_number("Mbit/s"),
        "monthly_cap_gib": positive_number("GiB"),
        "hours": array_of(hours_window),
        "timezone": timezone,
        "protected_networks": array_of(network),
        "allow_networks": array_of(network),
        "blocked_ports": array_of(port_spec),
        "dns": ipv4_address,
    },
    "client": {
        "near": geohash,
        "exit_region": geohash,
        "max_price": integer(0, MAX_U64),
        "lockdown": boolean,
        "allow_lan": boolean,
        "timeout": positive_number("seconds"),
    },
}


# ---- where things are in the text


Location = tuple[str | int, ...]  # key path; an int is an array index


class _Scanner:
    """Finds the line of every key, table header and array element. Skips values."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.found: dict[Location, int] = {}

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def advance(self, n: int = 1) -> None:
        self.line += self.text.count("\n", self.pos, self.pos + n)
        self.pos += n

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip_blank(self, newlines: bool) -> None:
        while not self.at_end():
            c = self.peek()
            if c in " \t\r" or (newlines and c == "\n"):
                self.advance()
            elif c == "#":
                self.skip_comment()
            else:
                return

    def skip_comment(self) -> None:
        end = self.text.find("\n", self.pos)
        self.advance((len(self.text) if end < 0 else end) - self.pos)

    def skip_line(self) -> None:
        end = self.text.find("\n", self.pos)
        self.advance((len(self.text) if end < 0 else end + 1) - self.pos)

    def key(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self.skip_blank(newlines=False)
            c = self.peek()
            if c in ('"', "'"):
                parts.append(self.quoted_key(c))
            else:
                start = self.pos
                while not self.at_end() and (self.peek().isalnum() or self.peek() in "_-"):
                    self.advance()
                if self.pos == start:
                    raise ValueError("not a key")
                parts.append(self.text[start : self.pos])
            self.skip_blank(newlines=False)
            if self.peek() != ".":
                return tuple(parts)
            self.advance()

    def quoted_key(self, quote: str) -> str:
        start = self.pos
        self.string()
        raw = self.text[start : self.pos]
        try:
            value = tomllib.loads(f"k = {raw}")["k"]
        except tomllib.TOMLDecodeError:
            return raw.strip(quote)
        return str(value)

    def string(self) -> None:
        """Skip one string of any of TOML's four kinds."""
        quote = self.peek()
        if self.peek(3) == quote * 3:
            self.advance(3)
            while not self.at_end():
                if quote == '"' and self.peek() == "\\":
                    self.advance(2)
                elif self.peek(3) == quote * 3:
                    self.advance(3)
                    while self.peek() == quote:  # up to two quotes may end the content
                        self.advance()
                    return
                else:
                    self.advance()
            return
        self.advance()
        while not self.at_end() and self.peek() not in (quote, "\n"):
            self.advance(2 if quote == '"' and self.peek() == "\\" else 1)
        if self.peek() == quote:
            self.advance()

    def value(self, where: Location) -> None:
        self.skip_blank(newlines=False)
        c = self.peek()
        if c in ('"', "'"):
            self.string()
        elif c == "[":
            self.array(where)
        elif c == "{":
            self.inline_table(where)
        else:
            while not self.at_end() and self.peek() not in ",]}\n#":
                self.advance()

    def array(self, where: Location) -> None:
        self.advance()  # [
        index = 0
        while True:
            self.skip_blank(newlines=True)
            if self.at_end():
                return
            if self.peek() == "]":
                self.advance()
                return
            if self.peek() == ",":
                self.advance()
                continue
            self.found.setdefault((*where, index), self.line)
            before = self.pos
            self.value((*where, index))
            index += 1
            if self.pos == before:
                self.advance()  # malformed: tomllib reports it; never loop

    def inline_table(self, where: Location) -> None:
        self.advance()  # {
        while True:
            self.skip_blank(newlines=True)
            if self.at_end():
                return
            if self.peek() == "}":
                self.advance()
                return
            if self.peek() == ",":
                self.advance()
                continue
            before = self.pos
            try:
                key = self.key()
            except ValueError:
                self.advance()
                continue
            self.found.setdefault((*where, *key), self.line)
            if self.peek() == "=":
                self.advance()
                self.value((*where, *key))
            if self.pos == before:
                self.advance()

    def document(self) -> dict[Location, int]:
        table: tuple[str, ...] = ()
        while True:
            self.skip_blank(newlines=True)
            if self.at_end():
                return self.found
            line_start = self.line
            try:
                if self.peek() == "[":
                    double = self.peek(2) == "[["
                    self.advance(2 if double else 1)
                    table = self.key()
                    self.found.setdefault(table, line_start)
                    self.skip_line()
                    continue
                key = self.key()
                self.found.setdefault((*table, *key), line_start)
                if self.peek() != "=":
                    self.skip_line()
                    continue
                self.advance()
                self.value((*table, *key))
            except ValueError:
                pass
            self.skip_line()


def locate(text: str) -> dict[Location, int]:
    """Line (1-based) of each key path, table header and array element in ``text``.

    Array elements are keyed by their index: ``("sharing", "hours", 1)``.
    """
    return _Scanner(text).document()


# ---- checking


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int
    key: str  # dotted, "" for the file as a whole
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "key": self.key, "message": self.message}


def _line_of(lines: Mapping[Location, int], where: Location) -> int:
    """The line of ``where``, else of its nearest located ancestor, else 1."""
    for n in range(len(where), 0, -1):
        if where[:n] in lines:
            return lines[where[:n]]
    return 1


_SYNTAX_AT = re.compile(r"\(at line (\d+), column (\d+)\)")


def check(text: str, file: str = "<config>") -> tuple[dict[str, Any], list[ConfigProblem]]:
    """Validate ``text``; return the converted values by dotted key, and every problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _SYNTAX_AT.search(str(exc))
        line = int(m.group(1)) if m else 1
        message = _SYNTAX_AT.sub("", str(exc)).strip()
        return {}, [ConfigProblem(file, line, "", f"not valid TOML: {message}")]
    lines = locate(text)
    values: dict[str, Any] = {}
    problems: list[ConfigProblem] = []

    def problem(where: Location, message: str) -> None:
        key = ".".join(str(p) for p in where if isinstance(p, str))
        if where and isinstance(where[-1], int):
            key += f"[{where[-1]}]"
        problems.append(ConfigProblem(file, _line_of(lines, where), key, message))

    def known(table: str) -> str:
        return ", ".join(sorted(SCHEMA[table])) or "none"

    for name, value in doc.items():
        if name in SCHEMA and name and isinstance(value, dict):
            for key, item in value.items():
                _check_one(name, key, item, values, problem, known)
        elif name in SCHEMA[""]:
            _check_one("", name, value, values, problem, known)
        elif name in SCHEMA:
            problem((name,), f"expected a table [{name}], got {_type_name(value)}")
        else:
            tables = ", ".join(f"[{t}]" for t in SCHEMA if t)
            problem(
                (name,),
                f"unknown key {name!r}; expected one of {known('')} or a table {tables}",
            )
    _cross_checks(values, problem)
    return values, sorted(problems, key=lambda p: p.line)


def _check_one(  # noqa: PLR0917 - one call site, in order
    table: str,
    key: str,
    value: object,
    values: dict[str, Any],
    problem: Callable[[Location, str], None],
    known: Callable[[str], str],
) -> None:
    where: tuple[str, ...] = (table, key) if table else (key,)
    dotted = ".".join(where)
    convert = SCHEMA[table].get(key)
    if convert is None:
        section = f"[{table}]" if table else "the top level"
        problem(where, f"unknown key {key!r} in {section}; expected one of {known(table)}")
        return
    item = convert.item if isinstance(convert, array_of) else None
    if item is not None and isinstance(value, list):
        out, ok = [], True
        for i, element in enumerate(value):
            try:
                out.append(item(element))
            except BadValueError as exc:
                problem((*where, i), str(exc))
                ok = False
        if ok:
            values[dotted] = out
        return
    try:
        values[dotted] = convert(value)
    except BadValueError as exc:
        problem(where, str(exc))


def _cross_checks(values: dict[str, Any], problem: Callable[[Location, str], None]) -> None:
    if values.get("sharing.hours") and "sharing.timezone" not in values:
        problem(
            ("sharing", "hours"),
            'hours need an explicit time zone: add timezone = "Europe/Berlin" (or "UTC")',
        )
    from relay.exit import ExitPolicy  # noqa: PLC0415 - relay imports this module

    try:
        ExitPolicy.from_flags(
            allow=values.get("sharing.allow_networks", ()),
            deny=values.get("sharing.protected_networks", ()),
            block_ports=["none", *values.get("sharing.blocked_ports", ["tcp/25"])],
            dns=values.get("sharing.dns"),
        )
    except LocalError as exc:
        key = "allow_networks" if "allow" in exc.what else "protected_networks"
        if "dns" in exc.what:
            key = "dns"
        problem(("sharing", key), exc.one_line().removeprefix("error: "))


# ---- files


@dataclass(frozen=True)
class Config:
    """Converted values by dotted key; ``path`` is None when no file was read."""

    path: Path | None
    values: Mapping[str, Any]

    def get(self, key: str, default: Any = None) -> Any:  # noqa: ANN401
        return self.values.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.values


EMPTY: Final = Config(None, {})


def config_path(given: str | None) -> tuple[Path | None, bool]:
    """The file to read (None: none), and whether it must exist (named by flag or env)."""
    text = given if given is not None else os.environ.get(CONFIG_ENV)
    if text is None:
        return DEFAULT_CONFIG, False
    if text in ("", "none"):
        return None, False
    return Path(text), True


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text", "a config file is UTF-8 TOML") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None


def load_file(given: str | None) -> Config:
    """Read and check the config; ``ConfigError`` (exit 3) naming the first problem."""
    path, required = config_path(given)
    if path is None or (not required and not path.exists()):
        return EMPTY
    values, problems = check(read_text(path), str(path))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{problems[0]}{more}", f"`meshvpn config check {path}` lists them all")
    return Config(path, values)
