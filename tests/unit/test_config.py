"""meshvpn.config: every problem with its file, its line and what was expected."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshvpn import cli
from meshvpn.config import SCHEMA, check, load_file, locate
from meshvpn.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "etc" / "meshvpn.toml"

# Line numbers are part of what is tested: the comments, the multi-line string and
# the multi-line array before the broken keys are there to push them down.
DOC = '''\
# a relay's config
state_dir = "/var/lib/meshvpn"   # comment with a = sign

[relay]
listen_port = 51820
geohash = """u33d"""

[sharing]
price_per_gib = "1000000"
hours = [
  "08:00-12:00",   # morning
  "18:00-23:30",
]
timezone = "Europe/Berlin"
protected_networks = [
  "192.168.178.0/24",
  "10.1.2.3/8",
  "fd00::/8",
]
max_session = 5
'''


def problems_of(text: str) -> list[tuple[int, str, str]]:
    _, problems = check(text, "t.toml")
    return [(p.line, p.key, p.message) for p in problems]


def test_wrong_type_unknown_key_and_bad_cidr_with_their_lines() -> None:
    assert problems_of(DOC) == [
        (9, "sharing.price_per_gib", "expected an integer, got a string"),
        (
            17,
            "sharing.protected_networks[1]",
            (
                "expected a network in CIDR notation, e.g. 192.168.1.0/24, got '10.1.2.3/8':"
                " 10.1.2.3/8 has host bits set (did you mean 10.0.0.0/8?)"
            ),
        ),
        (
            20,
            "sharing.max_session",
            (
                "unknown key 'max_session' in [sharing]; expected one of allow_networks,"
                " bandwidth_mbit, blocked_ports, dns, exit, hours, max_sessions, monthly_cap_gib,"
                " price_per_gib, protected_networks, timezone"
            ),
        ),
    ]


def test_more_wrong_types() -> None:
    text = (
        "[sharing]\n"
        "exit = 1\n"  # 2
        "bandwidth_mbit = true\n"  # 3
        "blocked_ports = 'tcp/25'\n"  # 4
        "max_sessions = -1\n"  # 5
        "[client]\n"
        "lockdown = 'yes'\n"  # 7
        "[relay]\n"
        "pool = '100.64.0.0/33'\n"  # 9
    )
    assert [(line, key) for line, key, _ in problems_of(text)] == [
        (2, "sharing.exit"),
        (3, "sharing.bandwidth_mbit"),
        (4, "sharing.blocked_ports"),
        (5, "sharing.max_sessions"),
        (7, "client.lockdown"),
        (9, "relay.pool"),
    ]
    messages = [m for _, _, m in problems_of(text)]
    assert messages[0] == "expected true or false, got an integer"
    assert messages[1] == "expected a number of Mbit/s, got a boolean"
    assert messages[2] == "expected an array, got a string"
    assert messages[3] == "expected an integer from 0 to 100000, got -1"


def test_unknown_keys_at_the_top_and_unknown_tables() -> None:
    text = 'statedir = "/x"\n\n[sharin]\nprice_per_gib = 1\n[relay]\n"quoted key" = 1\n'
    got = problems_of(text)
    assert [(line, key) for line, key, _ in got] == [
        (1, "statedir"),
        (3, "sharin"),
        (6, "relay.quoted key"),
    ]
    assert "expected one of broker, interface, state_dir, wg_backend or a table" in got[0][2]


def test_syntax_errors_carry_tomllibs_line() -> None:
    assert problems_of("[sharing]\nprice_per_gib = \n") == [
        (2, "", "not valid TOML: Invalid value")
    ]


def test_dotted_keys_and_inline_tables_are_located() -> None:
    text = "sharing.exit = 'no'\nclient = { near = 'u33d', lockdown = 3 }\n"
    assert [(line, key) for line, key, _ in problems_of(text)] == [
        (1, "sharing.exit"),
        (2, "client.lockdown"),
    ]


def test_cross_checks() -> None:
    text = "[sharing]\nhours = ['08:00-09:00']\nallow_networks = ['127.0.0.0/8']\n"
    got = problems_of(text)
    assert got[0][:2] == (2, "sharing.hours")
    assert "explicit time zone" in got[0][2]
    assert got[1][:2] == (3, "sharing.allow_networks")
    assert "loopback addresses are never forwarded" in got[1][2]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("'08:00-23:30'", True),
        ("'22:00-06:00'", True),
        ("'00:00-24:00'", True),
        ("'24:00-01:00'", False),
        ("'8-9'", False),
        ("'08:00-08:00'", False),
        ("'08:61-09:00'", False),
    ],
)
def test_hours_windows(value: str, ok: bool) -> None:
    got = problems_of(f"[sharing]\ntimezone = 'UTC'\nhours = [{value}]\n")
    assert (got == []) == ok, got


def test_good_values_are_converted() -> None:
    values, problems = check(
        "broker = 'b.example:1883'\n[sharing]\nbandwidth_mbit = 5\nblocked_ports = ['UDP/5060']\n"
        "timezone = 'Europe/Berlin'\n"
    )
    assert problems == []
    assert values == {
        "broker": "b.example:1883",
        "sharing.bandwidth_mbit": 5.0,
        "sharing.blocked_ports": ["udp/5060"],
        "sharing.timezone": "Europe/Berlin",
    }


def test_the_shipped_config_is_clean_and_documents_every_key() -> None:
    text = SHIPPED.read_text()
    assert check(text, str(SHIPPED))[1] == []
    # every key appears (commented out or set) in its table, so the file cannot fall behind
    table = ""
    seen: set[tuple[str, str]] = set()
    for line in text.splitlines():
        bare = line.lstrip("# ").strip()
        if m := re.fullmatch(r"\[(\w+)\]", bare):
            table = m.group(1)
        elif m := re.match(r"(\w+) = ", bare):
            seen.add((table, m.group(1)))
    want = {(t, k) for t, keys in SCHEMA.items() for k in keys}
    assert want - seen == set()


def test_load_file_raises_with_the_first_problem(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[sharing]\nexit = 'no'\nprice_per_gib = -1\n")
    with pytest.raises(ConfigError) as info:
        load_file(str(path))
    assert info.value.exit_code == 3
    assert info.value.what == (
        f"{path}:2: sharing.exit: expected true or false, got a string (and 1 more)"
    )
    with pytest.raises(ConfigError, match="cannot read config"):
        load_file(str(tmp_path / "missing.toml"))


def test_missing_default_config_is_no_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHVPN_CONFIG", raising=False)
    monkeypatch.setattr("meshvpn.config.DEFAULT_CONFIG", Path("/nonexistent/meshvpn.toml"))
    assert load_file(None).path is None


def test_config_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(DOC)
    assert cli.main(["config", "check", str(path)]) == 3
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{path}:9: sharing.price_per_gib: expected an integer, got a string"
    assert len(err) == 3
    assert cli.main(["config", "check", str(path), "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert [p["line"] for p in out["problems"]] == [9, 17, 20]
    assert cli.main(["config", "check", str(SHIPPED)]) == 0
    assert capsys.readouterr().out == f"{SHIPPED}: ok\n"


def test_flags_win_over_the_file_and_the_environment_over_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "state_dir = '/srv/mv'\n[sharing]\nprice_per_gib = 5\nmax_sessions = 3\n"
        "protected_networks = ['192.0.2.0/24']\n"
    )
    monkeypatch.delenv("MESHVPN_STATE_DIR", raising=False)
    monkeypatch.delenv("MESHVPN_WG_BACKEND", raising=False)
    args = cli.build_parser().parse_args(
        ["relay", "--config", str(path), "--price", "7", "--deny", "198.51.100.0/24"]
    )
    values = cli._relay_values(args, cli._config(args))
    assert values["sharing.price_per_gib"] == 7
    assert values["sharing.max_sessions"] == 3
    assert values["sharing.protected_networks"] == ["192.0.2.0/24", "198.51.100.0/24"]
    assert values["sharing.blocked_ports"] == ["tcp/25"]
    assert cli._state_dir(args) == Path("/srv/mv")
    monkeypatch.setenv("MESHVPN_STATE_DIR", "/env/mv")
    assert cli._state_dir(args) == Path("/env/mv")
    args = cli.build_parser().parse_args(["relay", "--config", str(path), "--hours", "8:00-9:00"])
    with pytest.raises(Exception, match="bad --hours"):
        cli._relay_values(args, cli._config(args))


# ---- the locator against the parser, on generated documents

bare_keys = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
scalars = st.one_of(
    st.integers(-1000, 1000).map(str),
    st.booleans().map(lambda b: "true" if b else "false"),
    st.text(st.characters(codec="ascii", exclude_characters='"\\\r'), max_size=12).map(json.dumps),
    st.sampled_from(["'lit[eral]'", '"""\nk = 1\n[not.a.table]\n"""', "'''\n# no\n'''"]),
)


@st.composite
def documents(draw: st.DrawFn) -> tuple[str, dict[tuple[str | int, ...], int]]:
    lines: list[str] = ["# generated"]
    want: dict[tuple[str | int, ...], int] = {}
    used_tables: set[str] = set()
    for table in ["", *draw(st.lists(bare_keys, max_size=3, unique=True))]:
        if table:
            if table in used_tables:
                continue
            used_tables.add(table)
            lines.append(f"[{table}]  # a table")
            want[(table,)] = len(lines)
        for key in draw(st.lists(bare_keys, max_size=4, unique=True)):
            if table == "" and key in used_tables | set():
                continue
            path = (table, key) if table else (key,)
            start = len(lines) + 1
            if draw(st.booleans()):
                items = draw(st.lists(scalars.filter(lambda s: "\n" not in s), max_size=3))
                lines.append(f"{key} = [")
                for i, item in enumerate(items):
                    lines.append(f"  {item},  # element {i}")
                    want[(*path, i)] = len(lines)
                lines.append("]")
            else:
                value = draw(scalars)
                lines.extend(f"{key} = {value}".split("\n"))
            want[path] = start
            lines.append("")
    return "\n".join(lines) + "\n", want


@settings(max_examples=200, deadline=None)
@given(documents())
def test_locate_agrees_with_where_things_were_written(
    doc: tuple[str, dict[tuple[str | int, ...], int]],
) -> None:
    text, want = doc
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # a generated clash (a top key named like a later table): not our concern
    got = locate(text)
    assert {k: got.get(k) for k in want} == want


def test_environment_names_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.toml"
    path.write_text("[client]\nnear = 'u33d'\n")
    monkeypatch.setenv("MESHVPN_CONFIG", str(path))
    assert load_file(None).get("client.near") == "u33d"
    monkeypatch.setenv("MESHVPN_CONFIG", "")
    assert load_file(None).path is None
    assert os.environ["MESHVPN_CONFIG"] == ""
