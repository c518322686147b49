"""The ``meshvpn`` command line.

Exit codes: 0 ok; 1 error on this host; 2 bad usage; 3 bad configuration or
state directory; 4 another agent owns the state directory; 5 a peer did not
answer or misbehaved; 130 interrupted. Errors are one line on stderr:
``error: <what went wrong>; <what to do>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import select
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from meshvpn import __version__
from meshvpn.errors import LocalError, MeshvpnError
from meshvpn.identity import DEFAULT_STATE_DIR, PublicKey, init_identity, load_identity

if TYPE_CHECKING:
    from meshvpn.wireguard.backend import BackendName

DEFAULT_IFNAME = "meshvpn0"


def _config(args: argparse.Namespace) -> Any:  # noqa: ANN401 - meshvpn.config.Config
    """The config file (``--config``, ``$MESHVPN_CONFIG``, /etc/meshvpn/meshvpn.toml), read once."""
    from meshvpn.config import load_file  # noqa: PLC0415

    if getattr(args, "_config", None) is None:
        args._config = load_file(getattr(args, "config", None))  # noqa: SLF001
    return args._config  # noqa: SLF001


def _state_dir(args: argparse.Namespace) -> Path:
    """--state-dir, else $MESHVPN_STATE_DIR, else the config's state_dir, else the default."""
    given = args.state_dir or os.environ.get("MESHVPN_STATE_DIR")
    if given is None:
        given = _config(args).get("state_dir", str(DEFAULT_STATE_DIR))
    return Path(given).absolute()


def _option(args: argparse.Namespace, attr: str, key: str, default: Any = None) -> Any:  # noqa: ANN401
    """A flag given on the command line wins over the config file, which wins over ``default``."""
    value = getattr(args, attr, None)
    return value if value is not None else _config(args).get(key, default)


def _checked(flag: str, text: str, convert: Any) -> Any:  # noqa: ANN401
    from meshvpn.config import BadValueError  # noqa: PLC0415

    try:
        return convert(text)
    except BadValueError as exc:
        raise LocalError(f"bad {flag} {text!r}: {exc}") from None


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def cmd_init(args: argparse.Namespace) -> int:
    identity, created = init_identity(_state_dir(args))
    for name in created:
        print(f"created {_state_dir(args) / name}")
    if not created and args.enroll is None:
        print(f"keys already present in {_state_dir(args)}; nothing changed")
    print(f"node id: {identity.node_id}")
    print(f"identity key: {identity.identity_public.b64}")
    if args.enroll is not None:
        from meshvpn.mqtt import install_enrollment  # noqa: PLC0415

        path = Path(args.enroll)
        try:
            bundle = path.read_bytes()
        except OSError as exc:
            raise LocalError(f"cannot read {path}: {exc.strerror}") from None
        enrolled = install_enrollment(_state_dir(args), identity, bundle)
        print(
            f"enrolled as {enrolled.username} ({enrolled.role}) until"
            f" {enrolled.not_after:%Y-%m-%d}; broker CA sha256 {enrolled.ca_fingerprint}"
        )
    else:
        print(
            "to use a broker: `meshvpn broker enroll <identity key>` on the broker,"
            " then `meshvpn init --enroll FILE` here"
        )
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    summary = load_identity(_state_dir(args)).public_summary()
    if args.json:
        _print_json(summary)
    else:
        width = max(map(len, summary))
        for key, value in summary.items():
            print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0


def _run_agent(agent_coro: Any) -> int:  # noqa: ANN401 - a coroutine
    asyncio.run(agent_coro)
    return 0


def _endpoint(text: str | None, flag: str) -> Any:  # noqa: ANN401 - Endpoint | None
    from meshvpn.agent import resolve_local_endpoint  # noqa: PLC0415

    if text is None:
        return None
    try:
        return resolve_local_endpoint(text)
    except LocalError:
        raise LocalError(
            f"bad {flag} {text!r}", "give host:port, e.g. 198.51.100.2:51820"
        ) from None


# flag attribute -> config key, for the relay's settings (see meshvpn/config.py SCHEMA)
RELAY_FLAGS = {
    "interface": "interface",
    "wg_backend": "wg_backend",
    "broker": "broker",
    "listen_port": "relay.listen_port",
    "pool": "relay.pool",
    "endpoint": "relay.endpoint",
    "probe_port": "relay.probe_port",
    "geohash": "relay.geohash",
    "announce_ttl": "relay.announce_ttl",
    "metrics": "relay.metrics",
    "price": "sharing.price_per_gib",
    "exit": "sharing.exit",
    "capacity": "sharing.max_sessions",
    "bandwidth_mbit": "sharing.bandwidth_mbit",
    "monthly_cap_gib": "sharing.monthly_cap_gib",
    "timezone": "sharing.timezone",
    "dns": "sharing.dns",
}
# what a reload cannot change: the relay names these when the file changed them
RELAY_FIXED = (
    "interface", "wg_backend", "broker", "relay.listen_port", "relay.pool", "relay.endpoint",
    "relay.probe_port", "relay.geohash", "relay.announce_ttl", "relay.metrics",
)  # fmt: skip


def _relay_values(args: argparse.Namespace, config: Any) -> dict[str, Any]:  # noqa: ANN401
    """The config's values with the command line's on top (lists: flags add to the file's)."""
    from meshvpn import config as c  # noqa: PLC0415

    values = dict(config.values)
    if os.environ.get("MESHVPN_WG_BACKEND"):
        values["wg_backend"] = os.environ["MESHVPN_WG_BACKEND"]
    for attr, key in RELAY_FLAGS.items():
        if getattr(args, attr, None) is not None:
            values[key] = getattr(args, attr)
    if args.hours:
        values["sharing.hours"] = [
            _checked("--hours", h.strip(), c.hours_window) for a in args.hours for h in a.split(",")
        ]
    if args.timezone is not None:
        _checked("--timezone", args.timezone, c.timezone)
    if args.metrics is not None:
        _checked("--metrics", args.metrics, c.listen_address)
    for attr, key in (("allow", "sharing.allow_networks"), ("deny", "sharing.protected_networks")):
        values[key] = [*values.get(key, []), *(getattr(args, attr) or [])]
    blocked = list(values.get("sharing.blocked_ports", ["tcp/25"]))
    for text in args.block_port or ():
        if text.strip().lower() == "none":
            blocked.clear()
        else:
            blocked.append(_checked("--block-port", text, c.port_spec))
    values["sharing.blocked_ports"] = blocked
    if values.get("sharing.hours") and "sharing.timezone" not in values:
        raise LocalError(
            "sharing hours need an explicit time zone", "add --timezone UTC (or Europe/Berlin...)"
        )
    return values


def cmd_relay(args: argparse.Namespace) -> int:
    from meshvpn.config import load_file  # noqa: PLC0415
    from meshvpn.mqtt import BrokerAddress  # noqa: PLC0415
    from relay.agent import RelayAgent, RelayOptions  # noqa: PLC0415
    from relay.mesh import MeshOptions  # noqa: PLC0415
    from relay.operator import OperatorSettings, settings_from  # noqa: PLC0415

    mesh = None
    if args.mesh:
        if args.mesh_k < 1:
            raise LocalError(f"bad --mesh-k {args.mesh_k}", "give at least 1")
        mesh = MeshOptions(
            k=args.mesh_k,
            neighbours=frozenset(args.mesh_neighbour or ()),
            link_port_base=args.mesh_port,
        )

    values = _relay_values(args, _config(args))
    state_dir = _state_dir(args)

    def reload() -> tuple[OperatorSettings, dict[str, Any]]:
        fresh = _relay_values(args, load_file(getattr(args, "config", None)))
        return settings_from(fresh), {k: fresh.get(k) for k in RELAY_FIXED}

    pool_text = values.get("relay.pool", "100.64.0.0/24")
    try:
        pool = ipaddress.IPv4Network(pool_text)
        settings = settings_from(values)
    except ValueError as exc:
        raise LocalError(f"bad relay settings: {exc}") from None
    metrics = None
    if values.get("relay.metrics"):
        host, _, port = str(values["relay.metrics"]).rpartition(":")
        metrics = (host.strip("[]"), int(port))
    broker = values.get("broker")
    opts = RelayOptions(
        state_dir=state_dir,
        ifname=values.get("interface", DEFAULT_IFNAME),
        backend=values.get("wg_backend", "auto"),
        ready_fd=args.ready_fd,
        listen_port=values.get("relay.listen_port", 51820),
        pool=pool,
        exit=settings.exit,
        broker=BrokerAddress.parse(broker) if broker else None,
        endpoint=_endpoint(values.get("relay.endpoint"), "--endpoint"),
        probe_port=values.get("relay.probe_port", 0),
        geohash=values.get("relay.geohash", ""),
        price_per_gib=settings.price_per_gib,
        capacity=settings.max_sessions,
        announce_ttl_s=values.get("relay.announce_ttl", 60),
        exit_policy=settings.exit_policy,
        operator=settings,
        reload=reload,
        fixed=tuple((k, values.get(k)) for k in RELAY_FIXED),
        metrics=metrics,
        mesh=mesh,
        accounting_key=_accounting_key(args.accounting_key),
    )
    try:
        agent = RelayAgent(opts)
    except ValueError as exc:
        raise LocalError(str(exc)) from None
    return _run_agent(agent.run())


def _accounting_key(text: str | None) -> PublicKey | None:
    if text is None:
        return None
    try:
        return PublicKey.from_b64(text)
    except ValueError:
        raise LocalError(
            "bad --accounting-key", "give the service's identity key (`meshvpn id`)"
        ) from None


def cmd_admit(args: argparse.Namespace) -> int:
    from meshvpn.control import call  # noqa: PLC0415

    try:
        PublicKey.from_b64(args.wireguard_key)
    except ValueError as exc:
        raise LocalError(
            f"bad WireGuard key: {exc}", "give the client's public key (base64)"
        ) from None
    answer = call(_state_dir(args), "admit", wireguard_key=args.wireguard_key)
    if args.json:
        _print_json({k: v for k, v in answer.items() if k != "ok"})
    else:
        print(
            "admitted; give the client:"
            f" --address {answer['address']} --relay-key {answer['relay_key']}"
        )
    return 0


def _connect_options(args: argparse.Namespace) -> Any:  # noqa: ANN401
    from meshvpn.client import ClientOptions  # noqa: PLC0415
    from meshvpn.mqtt import BrokerAddress  # noqa: PLC0415

    broker = _option(args, "broker", "broker", None)
    if args.hops < 1:
        raise LocalError(f"bad --hops {args.hops}", "give 1 (single hop) or more")
    if (args.exit or args.entry or args.hops > 1) and broker is None:
        raise LocalError("--exit, --entry and --hops need --broker", "add --broker HOST:PORT")
    manual = [args.relay, args.relay_key, args.address]
    if broker is None and None in manual:
        raise LocalError(
            "connect needs --broker, or all of --relay, --relay-key and --address",
            "e.g. `meshvpn connect --broker 203.0.113.2:8883`",
        )
    relay_key = address = None
    if args.relay_key is not None:
        try:
            relay_key = PublicKey.from_b64(args.relay_key)
        except ValueError as exc:
            raise LocalError(
                f"bad --relay-key: {exc}", "give the relay's WireGuard public key (base64)"
            ) from None
    if args.address is not None:
        try:
            address = ipaddress.IPv4Interface(args.address)
        except ValueError as exc:
            raise LocalError(
                f"bad --address {args.address!r}: {exc}", "give e.g. 100.64.0.2/32"
            ) from None
    backend = args.wg_backend or os.environ.get("MESHVPN_WG_BACKEND")
    return ClientOptions(
        state_dir=_state_dir(args),
        ifname=_option(args, "interface", "interface", DEFAULT_IFNAME),
        backend=cast("BackendName", backend or _config(args).get("wg_backend", "auto")),
        ready_fd=args.ready_fd,
        relay=_endpoint(args.relay, "--relay"),
        relay_key=relay_key,
        address=address,
        broker=BrokerAddress.parse(broker) if broker else None,
        near=_option(args, "near", "client.near", ""),
        exit_region=_option(args, "exit_region", "client.exit_region", ""),
        max_price=_option(args, "max_price", "client.max_price", None),
        handshake_timeout=_option(args, "timeout", "client.timeout", 10.0),
        lockdown=_option(args, "lockdown", "client.lockdown", default=True),
        allow_lan=_option(args, "allow_lan", "client.allow_lan", default=False),
        exit_node=args.exit or "",
        entry_node=args.entry or "",
        hops=args.hops,
    )


def cmd_connect(args: argparse.Namespace) -> int:
    from meshvpn.client import ClientAgent  # noqa: PLC0415

    opts = _connect_options(args)
    if args.foreground:
        return _run_agent(ClientAgent(opts).run())
    # Fail here, in the user's terminal, if keys or the broker certificate are bad.
    identity = load_identity(opts.state_dir)
    if opts.broker is not None:
        from meshvpn.mqtt import load_credentials  # noqa: PLC0415

        load_credentials(opts.state_dir, identity)
    # multi-hop: two handshakes (the entry, then the exit through it)
    waits = 2 if opts.multihop else 1
    return _run_detached(opts, waits * opts.handshake_timeout + 15)


def _run_detached(opts: Any, timeout: float) -> int:  # noqa: ANN401 - ClientOptions
    """Fork: the child becomes the agent in its own session, the parent waits for
    it to say ready (or why not) on a pipe. Forking, rather than starting a new
    interpreter, saves the agent a second Python start-up on every connect."""
    import dataclasses  # noqa: PLC0415

    from meshvpn.client import ClientAgent  # noqa: PLC0415

    log_path = opts.state_dir / "agent.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the agent
        os.close(read_end)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        code = 1
        try:
            code = _run_agent(ClientAgent(dataclasses.replace(opts, ready_fd=write_end)).run())
        except MeshvpnError as exc:
            print(exc.one_line(), file=sys.stderr)
            code = exc.exit_code
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    os.close(log_fd)
    started = time.monotonic()
    answer = _read_ready(read_end, timeout)
    if answer is None:
        waited = time.monotonic() - started
        _dump_stacks(pid)
        _stop_child(pid)
        for line in _tail(log_path, 40):
            print(f"agent.log: {line}", file=sys.stderr)
        if waited < timeout:
            raise LocalError(f"the agent exited before it was ready after {waited:.1f} s",
                             f"see {log_path}")  # fmt: skip
        raise LocalError(f"the agent did not report ready within {timeout:g} s", f"see {log_path}")
    if not answer.get("ok"):
        _stop_child(pid, signal_first=False)
        print(answer.get("error", "error: the agent failed"), file=sys.stderr)
        return int(answer.get("exit_code", 1))
    relay = answer.get("relay", {}).get("endpoint")
    if path := answer.get("path"):
        relay = f"{relay} ({path['entry']}) to exit {path['exit']}"
    print(
        f"connected through {relay} as {answer.get('address')} on {answer.get('interface')}"
        f" (agent pid {pid}); `meshvpn status` for details, `meshvpn disconnect` to stop"
    )
    return 0


def _read_ready(fd: int, timeout: float) -> dict[str, Any] | None:
    line = b""
    deadline = time.monotonic() + timeout
    with os.fdopen(fd, "rb") as pipe:
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(pipe.fileno(), 4096)
            if not chunk:
                break
            line += chunk
    try:
        answer = json.loads(line) if line else None
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _dump_stacks(pid: int) -> None:
    """Ask a stuck agent where it is stuck (meshvpn.agent.install_stack_dumps)."""
    import signal  # noqa: PLC0415

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.3)
        os.kill(pid, signal.SIGQUIT)
        time.sleep(0.3)


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            return fh.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _stop_child(pid: int, *, signal_first: bool = True) -> None:
    import signal  # noqa: PLC0415

    if signal_first:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def cmd_down(args: argparse.Namespace) -> int:
    from meshvpn.agent import StateLock, clean_stale  # noqa: PLC0415
    from meshvpn.control import call  # noqa: PLC0415
    from meshvpn.killswitch import TABLE as LOCKDOWN_TABLE  # noqa: PLC0415

    state_dir = _state_dir(args)
    if not state_dir.is_dir():
        print(f"nothing to stop: {state_dir} does not exist")
        return 0
    lock = StateLock(state_dir)
    if lock.held_by_other():
        pid = call(state_dir, "stop").get("pid", "?")
        deadline = time.monotonic() + args.timeout
        while lock.held_by_other():
            if time.monotonic() > deadline:
                raise LocalError(
                    f"the agent did not stop within {args.timeout:g} s",
                    f"look at {state_dir / 'agent.log'}; `kill` its pid as a last resort",
                )
            time.sleep(0.05)
        print(f"stopped the agent{f' (pid {pid})' if pid != '?' else ''}")
        return 0
    removed = asyncio.run(clean_stale(state_dir))
    for line in removed:
        print(f"cleaned up: {line}")
    if any(LOCKDOWN_TABLE in line for line in removed):
        print("the lockdown is lifted: this host's network is open again")
    if not removed:
        print("no agent running and nothing left behind")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from meshvpn.agent import StateLock  # noqa: PLC0415
    from meshvpn.footprint import Footprint  # noqa: PLC0415
    from meshvpn.killswitch import lockdown_left  # noqa: PLC0415
    from meshvpn.views import read_status  # noqa: PLC0415

    state_dir = _state_dir(args)
    if state_dir.is_dir() and not StateLock(state_dir).held_by_other():
        footprint = Footprint.load(state_dir)
        leftovers = not footprint.empty
        lockdown = lockdown_left(footprint)
        if args.json:
            _print_json({"running": False, "leftovers": leftovers, "lockdown": lockdown})
        elif lockdown:
            print(
                "not running; blocked: the last session ended without disconnect;"
                " run `meshvpn disconnect` to restore the network"
            )
        else:
            print(
                "not running"
                + ("; a crashed agent left state behind: run `meshvpn down`" if leftovers else "")
            )
        return 1
    answer = read_status(state_dir)
    if args.json:
        _print_json(answer)
        return 0
    _print_status(answer)
    if answer.get("role") == "client":
        dropped = sum((answer.get("lockdown_dropped") or {}).values())
        print(
            f"lockdown on: nothing leaves outside the tunnel ({dropped} packet(s) blocked)"
            if answer.get("lockdown")
            else "lockdown off: if the agent dies, traffic leaves outside the tunnel"
        )
    return 0


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def _fmt_handshake(ts: float | None) -> str:
    return f"{time.time() - ts:.0f} s ago" if ts else "never"


def _print_status(s: dict[str, Any]) -> None:
    print(f"{s['role']} {s['node_id']}  pid {s['pid']}  up {s['uptime_s']:.0f} s")
    print(f"interface {s['interface']} ({s['backend']})")
    if s["role"] == "relay":
        print(
            f"listening on UDP {s['listen_port']}, pool {s['pool']},"
            f" exit {'on' if s['exit'] else 'off'}"
        )
        print(f"{len(s['peers'])} client(s)")
        for p in s["peers"]:
            print(
                f"  {p['wireguard_key'][:8]}…  {p['address']:<15}  rx {_fmt_bytes(p['rx_bytes'])}"
                f"  tx {_fmt_bytes(p['tx_bytes'])}  handshake {_fmt_handshake(p['last_handshake'])}"
            )
        mesh = s.get("mesh")
        if mesh:
            print(
                f"mesh {mesh['address']}: {len(mesh['links'])} link(s),"
                f" {len(mesh['routes'])} route(s)"
            )
            for link in mesh["links"]:
                rtt = f"{link['rtt_ms']} ms" if link.get("rtt_ms") is not None else "rtt ?"
                print(f"  {link['interface']:<15} {link['node_id']}  {link['state']}  {rtt}")
            for line in mesh["events"][-5:]:
                print(f"  {line}")
    else:
        relay = s["relay"]
        path = s.get("path")
        if path:
            print(
                f"tunnel address {s['address']} via exit {path['exit']} ({path['exit_endpoint']})"
            )
            print(f"  entering at {path['entry']} ({relay['endpoint']})", end="")
            print(f", standby {path['standby_entry']}" if path["standby_entry"] else "")
        else:
            print(f"tunnel address {s['address']} via relay {relay['endpoint']}")
        if "rx_bytes" in relay:
            print(
                f"  rx {_fmt_bytes(relay['rx_bytes'])}  tx {_fmt_bytes(relay['tx_bytes'])}"
                f"  handshake {_fmt_handshake(relay['last_handshake'])}"
            )
        for line in (path or {}).get("events", []):
            print(f"  {line}")


def cmd_peers(args: argparse.Namespace) -> int:
    from meshvpn.views import peers_of, peers_text, read_status  # noqa: PLC0415

    view = peers_of(read_status(_state_dir(args)))
    if args.json:
        _print_json(view)
    else:
        print("\n".join(peers_text(view)))
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    from meshvpn.control import call  # noqa: PLC0415

    if args.count < 1:
        raise LocalError(f"bad --count {args.count}", "give 1 or more")
    timeout = 2.0 * (args.count + 8) + 5
    answer = call(
        _state_dir(args), "mesh_ping", timeout=timeout, node_id=args.node_id, count=args.count
    )
    answer.pop("ok", None)
    if args.json:
        _print_json(answer)
    else:
        _print_ping(answer)
    return 0 if answer["received"] else 5


def _print_ping(a: dict[str, Any]) -> None:
    route = a.get("route")
    first = (
        "no route in this relay's mesh table"
        if route is None
        else f"first hop {route['neighbour'] or '?'} via {route['via']}, metric {route['metric']}"
    )
    print(f"ping {a['node_id']} at {a['mesh_address']}: {first}")
    for hop in a["hops"]:
        who = hop["node_id"] or hop["address"] or "*"
        rtt = f"{hop['rtt_ms']:.1f} ms" if hop["rtt_ms"] is not None else "no answer"
        print(f"  {hop['hop']}  {who}  {rtt}{'  (the node)' if hop['reached'] else ''}")
    stats = (
        f"min/avg/max {a['min_ms']:.1f}/{a['avg_ms']:.1f}/{a['max_ms']:.1f} ms"
        if a["received"]
        else "no answer"
    )
    print(f"{a['sent']} sent, {a['received']} received, {stats}")


def cmd_dashboard(args: argparse.Namespace) -> int:
    from meshvpn.dashboard import run  # noqa: PLC0415

    if args.refresh <= 0 or args.refresh > 1:
        raise LocalError(f"bad --refresh {args.refresh:g}", "give seconds in (0, 1]")
    return run(_state_dir(args), args.refresh)


def cmd_config_check(args: argparse.Namespace) -> int:
    from meshvpn.config import check, config_path, read_text  # noqa: PLC0415

    path, _ = config_path(args.path)
    if path is None or not path.exists():
        raise LocalError(f"no config at {path}", "give its path: `meshvpn config check PATH`")
    _, problems = check(read_text(path), str(path))
    if args.json:
        _print_json(
            {"file": str(path), "ok": not problems, "problems": [p.to_json() for p in problems]}
        )
    elif problems:
        for problem in problems:
            print(problem, file=sys.stderr)
    else:
        print(f"{path}: ok")
    return 3 if problems else 0


def cmd_reload(args: argparse.Namespace) -> int:
    from meshvpn.control import call  # noqa: PLC0415

    answer = call(_state_dir(args), "reload")
    answer.pop("ok", None)
    if args.json:
        _print_json(answer)
        return 0
    print(f"reloaded: {', '.join(answer['changed']) or 'nothing changed'}")
    if answer["ended_sessions"]:
        print(f"ended {answer['ended_sessions']} session(s) that no longer fit")
    if answer["restart_needed"]:
        print(f"needs a restart to change: {', '.join(answer['restart_needed'])}")
    sharing = answer["sharing"]
    print(f"sharing {'open' if sharing['open'] else 'stopped: ' + sharing['reason']}")
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from meshvpn import broker  # noqa: PLC0415

    state_dir = Path(args.state_dir) if args.state_dir else broker.default_state_dir()
    state_dir = state_dir.absolute()
    if args.broker_command == "init":
        names = broker.init_broker(state_dir, args.name or [], dt.datetime.now(dt.UTC))
        _, ca_pem = broker.load_ca(state_dir)
        from meshvpn.pki import fingerprint  # noqa: PLC0415

        print(f"broker CA in {state_dir}, sha256 {fingerprint(ca_pem)}")
        print(f"server certificate for {', '.join(names)}")
        return 0
    if args.broker_command == "enroll":
        try:
            key = PublicKey.from_b64(args.identity_key)
        except ValueError as exc:
            raise LocalError(
                f"bad identity key: {exc}", "give the node's identity key (`meshvpn id`)"
            ) from None
        bundle = broker.enroll(state_dir, key, args.role, days=args.days)
        if args.out is None:
            sys.stdout.write(bundle.decode())
        else:
            Path(args.out).write_bytes(bundle)
            print(f"wrote {args.out}; on the node: `meshvpn init --enroll {args.out}`")
        return 0
    host, _, port = args.listen.rpartition(":")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
        cfg = broker.BrokerConfig(state_dir, address, int(port), names=tuple(args.name or ()))
    except ValueError:
        raise LocalError(
            f"bad --listen {args.listen!r}", "give addr:port, e.g. 0.0.0.0:8883"
        ) from None
    return broker.run_broker(cfg)


def cmd_lab(args: argparse.Namespace) -> int:
    from meshvpn.lab import nodes  # noqa: PLC0415

    return nodes.cli(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from meshvpn.lab import demo  # noqa: PLC0415

    return demo.run(args)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="PATH",
        help="the TOML config (default: $MESHVPN_CONFIG or /etc/meshvpn/meshvpn.toml if it"
        " exists); flags given here win over it",
    )


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        default=None,
        help="where the node's keys and runtime state live (default: $MESHVPN_STATE_DIR,"
        f" else the config's state_dir, else {DEFAULT_STATE_DIR})",
    )
    _add_config(p)


def _add_agent_flags(p: argparse.ArgumentParser) -> None:
    _add_state_dir(p)
    p.add_argument(
        "--interface",
        default=None,
        help=f"WireGuard interface name (default: {DEFAULT_IFNAME})",
    )
    p.add_argument(
        "--wg-backend",
        choices=["auto", "kernel", "userspace"],
        default=None,
        help="kernel WireGuard, wireguard-go, or auto: kernel when the module exists"
        " (default: $MESHVPN_WG_BACKEND or auto)",
    )
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)


def _add_relay_parser(sub: Any) -> None:  # noqa: ANN401 - argparse's private action type
    p = sub.add_parser(
        "relay",
        help="run the relay agent in the foreground",
        description="Run the relay agent: a WireGuard interface clients connect to, forwarding"
        " and NAT to the internet when exit is on. Stops cleanly on SIGTERM/SIGINT.",
    )
    _add_agent_flags(p)
    p.add_argument("--listen-port", type=int, help="WireGuard UDP port (default: 51820)")
    p.add_argument(
        "--pool",
        help="tunnel addresses for clients, inside 100.64.0.0/10 (default: 100.64.0.0/24)",
    )
    p.add_argument(
        "--no-exit",
        dest="exit",
        action="store_const",
        const=False,
        help="do not forward clients to the internet",
    )
    p.add_argument(
        "--exit", dest="exit", action="store_const", const=True, help="forward them (default)"
    )
    g = p.add_argument_group(
        "exit policy",
        "Clients never reach this router itself nor its LAN. Private, shared (CGNAT),"
        " link-local, loopback, multicast, reserved and documentation ranges are closed"
        " too, unless --allow opens them (never loopback, link-local or multicast).",
    )
    g.add_argument(
        "--allow",
        action="append",
        metavar="CIDR",
        help="open a closed range to clients, e.g. a lab's 203.0.113.0/24 (repeatable)",
    )
    g.add_argument(
        "--deny",
        action="append",
        metavar="CIDR",
        help="close a network to clients; wins over --allow (repeatable)",
    )
    g.add_argument(
        "--block-port",
        action="append",
        metavar="PROTO/PORT",
        help="drop clients' traffic to this port everywhere, e.g. udp/5060 (repeatable;"
        " default: tcp/25; `none` clears what comes before it, the default included)",
    )
    g.add_argument(
        "--dns",
        metavar="ADDR",
        help="send clients' DNS (udp and tcp 53, whatever address they ask) to this resolver",
    )
    g = p.add_argument_group("discovery (with --broker)")
    g.add_argument(
        "--broker",
        metavar="HOST:PORT",
        help="announce on this MQTT broker (TLS, port 8883 by default; needs `init --enroll`),"
        " take session requests",
    )
    g.add_argument("--endpoint", metavar="HOST:PORT", help="the address clients dial (announced)")
    g.add_argument(
        "--probe-port",
        type=int,
        help="UDP port for RTT probes (default: listen port + 1)",
    )
    g.add_argument("--geohash", help="coarse location as a geohash, e.g. u33d")
    g.add_argument(
        "--announce-ttl",
        type=int,
        help="announcement lifetime in seconds, refreshed at a third of it (default: 60)",
    )
    g = p.add_argument_group(
        "sharing (config [sharing]; reloaded on SIGHUP or `meshvpn reload`)",
        "Outside the hours or past the monthly cap the relay takes no sessions, ends the"
        " running ones and announces itself full.",
    )
    g.add_argument("--price", type=int, help="price per GiB in token units (default: 1000000)")
    g.add_argument(
        "--max-sessions",
        "--capacity",
        dest="capacity",
        type=int,
        help="most concurrent sessions; the next client is refused (default: 100)",
    )
    g.add_argument(
        "--bandwidth-mbit",
        type=float,
        metavar="MBIT",
        help="cap relayed traffic at this many Mbit/s each way (htb; default: no cap)",
    )
    g.add_argument(
        "--monthly-cap-gib",
        type=float,
        metavar="GIB",
        help="stop sharing for the rest of the month after relaying this much (default: none)",
    )
    g.add_argument(
        "--hours",
        action="append",
        metavar="HH:MM-HH:MM",
        help="share only within these hours (repeatable or comma-separated; needs --timezone)",
    )
    g.add_argument(
        "--timezone", metavar="ZONE", help="IANA zone for --hours and months (default: UTC)"
    )
    p.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        help="serve Prometheus metrics here, e.g. 127.0.0.1:9810 (default: off)",
    )
    g = p.add_argument_group("mesh (with --broker)")
    g.add_argument(
        "--mesh",
        action="store_true",
        help="link with nearby relays and route over the links, so clients can leave"
        " through an exit several hops away",
    )
    g.add_argument(
        "--mesh-k",
        type=int,
        default=3,
        metavar="K",
        help="how many nearest relays to link with (default: %(default)s)",
    )
    g.add_argument(
        "--mesh-neighbour",
        action="append",
        metavar="NODE_ID",
        help="link with exactly these relays instead of the nearest (repeatable)",
    )
    g.add_argument(
        "--mesh-port",
        type=int,
        default=51830,
        metavar="PORT",
        help="UDP port of the first mesh link; link n listens on PORT+n (default: %(default)s)",
    )
    g.add_argument(
        "--accounting-key",
        metavar="KEY",
        help="serve only clients this accounting service vouches for (credit notices)",
    )
    p.set_defaults(func=cmd_relay)


def _add_connect_parser(sub: Any) -> None:  # noqa: ANN401
    p = sub.add_parser(
        "connect",
        help="connect this host through the nearest relay (full tunnel)",
        description="Bring up a full tunnel through a relay: all traffic but WireGuard's own goes"
        " through it. With --broker, find the relays, probe the nearest and negotiate a session;"
        " or name the relay by hand. Returns once the relay has answered; the agent keeps"
        " running in the background (or in the foreground with --foreground).",
    )
    _add_agent_flags(p)
    g = p.add_argument_group("discovery")
    g.add_argument(
        "--broker",
        metavar="HOST:PORT",
        help="the MQTT broker relays announce on (TLS, port 8883 by default;"
        " needs `init --enroll`)",
    )
    g.add_argument(
        "--near",
        metavar="GEOHASH",
        help="your coarse location: relays nearby are probed first",
    )
    g.add_argument(
        "--exit-region",
        metavar="GEOHASH",
        help="only exits whose geohash starts with this",
    )
    g.add_argument(
        "--max-price", type=int, metavar="UNITS", help="highest price per GiB you accept"
    )
    g = p.add_argument_group(
        "multi-hop (with --broker)",
        "Enter the mesh at the nearest relay and leave it at an exit elsewhere: the entry"
        " sees only ciphertext, the exit never sees your address.",
    )
    g.add_argument("--exit", metavar="NODE_ID", help="leave the mesh at this exit relay")
    g.add_argument(
        "--hops",
        type=int,
        default=1,
        metavar="N",
        help="2 or more: leave at an exit other than the entry (with --exit-region: an exit"
        " there); the mesh's routing decides the path between them (default: %(default)s)",
    )
    g.add_argument(
        "--entry",
        metavar="NODE_ID",
        help="enter the mesh at this relay (single hop: connect through this relay)",
    )
    g = p.add_argument_group("by hand (without --broker)")
    g.add_argument("--relay", metavar="HOST:PORT", help="the relay's WireGuard endpoint")
    g.add_argument("--relay-key", metavar="KEY", help="the relay's WireGuard public key")
    g.add_argument(
        "--address", metavar="CIDR", help="this client's tunnel address, from `meshvpn admit`"
    )
    g = p.add_argument_group(
        "kill switch",
        "With --lockdown (the default) nothing leaves this host outside the tunnel: not"
        " while connecting (only the broker, the relays' probes, DHCP), not if the agent"
        " dies (the block stays until `meshvpn disconnect`).",
    )
    g.add_argument(
        "--lockdown",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="block all traffic outside the tunnel (default: on)",
    )
    g.add_argument(
        "--allow-lan",
        action="store_const",
        const=True,
        help="with --lockdown, still let this host and its directly connected private"
        " subnets (home LAN) reach each other",
    )
    p.add_argument(
        "--timeout",
        type=float,
        help="seconds to wait for the relay (default: 10)",
    )
    p.add_argument("--foreground", action="store_true", help="stay in the foreground (for systemd)")
    p.set_defaults(func=cmd_connect)


def _add_broker_parser(sub: Any) -> None:  # noqa: ANN401
    from meshvpn.pki import CLIENT_DAYS, ROLE_NODE, ROLES  # noqa: PLC0415

    p = sub.add_parser(
        "broker",
        help="run an MQTT broker (mosquitto) configured for meshvpn; enroll nodes on it",
        description="Without a subcommand: run mosquitto in the foreground, TLS 1.3 only, every"
        " client authenticated by a certificate from this broker's CA and held to its own"
        " topics. The CA and the server certificate are made on first use.",
    )
    state_help = "the broker's CA, certificates, config and persistence"
    state_help += " (default: $MESHVPN_BROKER_DIR or /var/lib/meshvpn/broker)"
    p.add_argument("--state-dir", default=None, help=state_help)
    p.add_argument(
        "--listen",
        default="127.0.0.1:8883",
        metavar="ADDR:PORT",
        help="where to listen (default: %(default)s)",
    )
    name_help = "a host name or address clients dial, for the server certificate (repeatable;"
    name_help += " default: the listen address, or the names already certified)"
    p.add_argument("--name", action="append", metavar="HOST", help=name_help)
    bsub = p.add_subparsers(dest="broker_command", metavar="BROKER_COMMAND")
    q = bsub.add_parser(
        "init", help="make the CA (if missing) and the server certificate, without running"
    )
    q.add_argument("--state-dir", default=argparse.SUPPRESS, help=state_help)
    q.add_argument(
        "--name", action="append", default=argparse.SUPPRESS, metavar="HOST", help=name_help
    )
    q = bsub.add_parser(
        "enroll",
        help="certify a node's identity key; prints the file for `meshvpn init --enroll`",
    )
    q.add_argument("identity_key", metavar="IDENTITY_KEY", help="the node's `identity key`")
    q.add_argument(
        "--role",
        choices=ROLES,
        default=ROLE_NODE,
        help="node (relay or client), or accounting (reads every receipt) (default: %(default)s)",
    )
    q.add_argument("--days", type=int, default=CLIENT_DAYS, help="validity (default: %(default)s)")
    q.add_argument("--out", metavar="FILE", help="write the file here instead of stdout")
    q.add_argument("--state-dir", default=argparse.SUPPRESS, help=state_help)
    p.set_defaults(func=cmd_broker)


def _add_read_parsers(sub: Any) -> None:  # noqa: ANN401
    """peers, ping, dashboard: what the agent knows, read over its control socket."""
    p = sub.add_parser(
        "peers",
        help="a relay's mesh neighbours and client sessions; a client's path",
    )
    _add_state_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser(
        "ping",
        help="from a relay: RTT and hops to another relay over the mesh (ICMPv6 echo)",
        description="Echo requests to the relay's mesh address, first with a growing hop"
        " limit (each relay on the way answers from its own mesh address), then COUNT"
        " plain ones; prints the hops and the RTTs, and this relay's route (first hop,"
        " metric). Exit 5 if no echo came back.",
    )
    _add_state_dir(p)
    p.add_argument("node_id", metavar="NODE_ID", help="the other relay's node id")
    p.add_argument(
        "-c", "--count", type=int, default=3, help="echo requests (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser(
        "dashboard",
        help="the agent live in the terminal: earnings, traffic, sessions, mesh (Ctrl-C ends)",
        description="Relay: node, roles, uptime, broker and accounting, earnings per epoch,"
        " throughput, data shared against the cap, sessions, mesh neighbours, alerts."
        " Client: path, throughput, bytes, cost, credit. The figures are those of `meshvpn"
        " status --json` and `meshvpn earnings --json`. Ctrl-C exits 0; if the agent goes"
        " away, one line says so and the exit code is 1.",
    )
    _add_state_dir(p)
    p.add_argument(
        "--refresh",
        type=float,
        default=0.5,
        metavar="S",
        help="seconds between refreshes, at most 1 (default: %(default)s)",
    )
    p.set_defaults(func=cmd_dashboard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshvpn",
        description="A bandwidth-sharing mesh VPN over WireGuard.",
        epilog="Exit codes: 0 ok; 1 error on this host (also: no agent runs, for status,"
        " peers, ping, dashboard); 2 bad usage; 3 bad configuration or state directory;"
        " 4 another agent owns the state directory; 5 a peer did not answer or misbehaved"
        " (ping: no echo came back); 130 interrupted. Errors are one line: `error: <what>;"
        " <what to do>`. Every command that reads has --json.",
    )
    parser.add_argument("--version", action="version", version=f"meshvpn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create this node's keys (never overwrites)")
    _add_state_dir(p)
    p.add_argument(
        "--enroll",
        metavar="FILE",
        help="install the broker certificate `meshvpn broker enroll` made for this node",
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("id", help="print the node id and public keys")
    _add_state_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_id)

    _add_relay_parser(sub)

    p = sub.add_parser(
        "admit",
        help="let a client's WireGuard key in (until discovery lands) and print its address",
    )
    _add_state_dir(p)
    p.add_argument(
        "wireguard_key", metavar="WIREGUARD_KEY", help="the client's WireGuard public key"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_admit)

    _add_connect_parser(sub)

    for name, text in (
        ("down", "stop the agent and remove everything it made"),
        ("disconnect", "same as down"),
    ):
        p = sub.add_parser(name, help=text)
        _add_state_dir(p)
        p.add_argument(
            "--timeout", type=float, default=15.0, help="seconds to wait for the agent to stop"
        )
        p.set_defaults(func=cmd_down)

    _add_broker_parser(sub)

    p = sub.add_parser(
        "config", help="the TOML configuration", description="Check the configuration file."
    )
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="CONFIG_COMMAND")
    p = config_sub.add_parser(
        "check",
        help="validate a config file: every problem with its file, line and what was expected"
        " (exit 3 if any)",
    )
    p.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help="the file (default: $MESHVPN_CONFIG or /etc/meshvpn/meshvpn.toml)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config_check)

    p = sub.add_parser(
        "reload",
        help="make the running relay re-read its config (as SIGHUP does) and say what changed",
        description="New settings apply at once: a new price to new sessions only; sessions"
        " that still fit the new limits are kept. A config with a problem changes nothing.",
    )
    _add_state_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("status", help="show what the agent is doing (exit 1 if none runs)")
    _add_state_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    _add_read_parsers(sub)

    from meshvpn.lab.nodes import add_lab_parsers  # noqa: PLC0415

    add_lab_parsers(sub, cmd_lab, cmd_demo)

    from accounting.cli import add_parsers as add_accounting_parsers  # noqa: PLC0415

    add_accounting_parsers(sub)  # `accounting ...` and `earnings ...`
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = int(args.func(args))
    except MeshvpnError as exc:
        print(exc.one_line(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code
