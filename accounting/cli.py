"""``meshvpn accounting ...`` and ``meshvpn earnings ...``: the accounting side of the CLI.

``meshvpn.cli`` only calls ``add_parsers``; everything else lives here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import ssl
from pathlib import Path
from typing import Any, Final

from accounting.earnings import Claim, check_claim, earnings_topic, open_report
from accounting.store import Store
from meshvpn.clock import now_ms
from meshvpn.errors import ConfigError, LocalError, RemoteError
from meshvpn.identity import DEFAULT_STATE_DIR, PublicKey, load_identity, node_id_of
from meshvpn.messages import MessageError
from meshvpn.mqtt import BrokerAddress, load_credentials

DEFAULT_ACCOUNTING_DIR: Final = Path("/var/lib/meshvpn-accounting")
EARNINGS_FILE: Final = "earnings.json"
EXIT_UNVERIFIED: Final = 1


def _accounting_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir).absolute()


def _store(args: argparse.Namespace) -> Store:
    return Store.open(args.db, _accounting_dir(args))


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _key(text: str, flag: str) -> PublicKey:
    try:
        return PublicKey.from_b64(text)
    except ValueError:
        raise LocalError(f"bad {flag}", "give the base64 Ed25519 key (`meshvpn id`)") from None


def client_node_id(account: str) -> str:
    """ACCOUNT as ``client:<node id>``, a node id, or the client's base64 identity key."""
    text = account.removeprefix("client:")
    if text.startswith("mv") and len(text) == 28 and text.isalnum():
        return text
    try:
        return node_id_of(PublicKey.from_b64(text))
    except ValueError:
        raise LocalError(
            f"bad account {account!r}",
            "give the client's node id (mv...) or identity key, from `meshvpn id` on the client",
        ) from None


# ---- meshvpn accounting ...


def cmd_serve(args: argparse.Namespace) -> int:
    from accounting.service import AccountingService, ServiceOptions  # noqa: PLC0415

    if args.epoch_seconds <= 0:
        raise LocalError("--epoch-seconds must be positive")
    opts = ServiceOptions(
        state_dir=_accounting_dir(args),
        broker=BrokerAddress.parse(args.broker),
        db_url=args.db,
        epoch_seconds=args.epoch_seconds,
        verify_workers=args.verify_workers,
    )
    asyncio.run(AccountingService(opts).run())
    return 0


def cmd_deposit(args: argparse.Namespace) -> int:
    node_id = client_node_id(args.account)
    ref = args.ref or f"cli-{secrets.token_hex(8)}"
    store = _store(args)
    try:
        try:
            new = store.deposit(node_id, args.amount, ref, now_ms())
        except ValueError as exc:
            raise LocalError(f"bad amount: {exc}") from None
        balance = store.balance(f"client:{node_id}")
    finally:
        store.close()
    if args.json:
        _print_json({"account": f"client:{node_id}", "ref": ref, "new": new, "balance": balance})
    elif new:
        print(f"deposited {args.amount} to client:{node_id} (ref {ref}); balance {balance}")
    else:
        print(f"deposit {ref} was already booked; balance {balance}")
    return 0


def cmd_balances(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        epoch, start_ms = store.current_epoch()
        data: dict[str, Any] = {
            "epoch": epoch,
            "epoch_start_ms": start_ms,
            "balances": store.balances(),
            "counters": store.counters(),
            "parked": store.parked_count(),
            "epochs": [
                {"epoch": e.epoch, "end_ms": e.end_ms, "emitted": e.emitted,
                 "carried": e.carried, "root": e.root.hex(), "statement": e.statement.hex()}
                for e in store.epochs()
            ],
        }  # fmt: skip
    finally:
        store.close()
    if args.json:
        _print_json(data)
        return 0
    print(f"epoch {epoch} (open since {start_ms}); {len(data['epochs'])} closed")
    for account, balance in sorted(data["balances"].items()):
        print(f"  {account:<34} {balance:>20,}")
    counters = data["counters"]
    print("receipts: " + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))
    return 0


# ---- meshvpn earnings ...


async def _fetch_retained(
    broker: BrokerAddress, topic: str, wait_s: float, tls: ssl.SSLContext
) -> bytes | None:
    import aiomqtt  # noqa: PLC0415

    try:
        async with aiomqtt.Client(
            broker.host, broker.port, timeout=wait_s, tls_context=tls
        ) as client:
            await client.subscribe(topic, qos=1)
            async with asyncio.timeout(wait_s):
                async for message in client.messages:
                    payload = message.payload
                    if isinstance(payload, bytes | bytearray) and payload:
                        return bytes(payload)
    except TimeoutError:
        return None
    except aiomqtt.MqttError as exc:
        raise RemoteError(f"broker {broker}: {exc}", "check --broker") from None
    return None


def _relay_key(args: argparse.Namespace) -> PublicKey | None:
    sd = Path(args.state_dir)
    if not (sd / "identity.key").exists():
        return None
    return load_identity(sd).identity_public


def cmd_earnings(args: argparse.Namespace) -> int:
    if args.earnings_command == "verify":
        return cmd_earnings_verify(args)
    if args.broker or args.relay:
        report, wire = _earnings_from_broker(args)
    else:
        report, wire = _earnings_from_agent(args)
    saved = Path(args.state_dir) / EARNINGS_FILE
    if saved.parent.is_dir() and not args.relay:
        tmp = saved.with_suffix(".tmp")
        tmp.write_bytes(wire)
        tmp.replace(saved)
    if args.json:
        _print_json(report)
        return 0
    _print_report(report, args.accounting_key is not None)
    return 0


def _earnings_from_agent(args: argparse.Namespace) -> tuple[dict[str, Any], bytes]:
    """The running relay's newest report: it follows its earnings topic itself."""
    from meshvpn.views import read_earnings  # noqa: PLC0415

    state_dir = Path(args.state_dir)
    if not (state_dir / "control.sock").exists():
        raise LocalError(
            f"no relay agent is running with state dir {state_dir}",
            "start it (`meshvpn relay --broker ...`), or give --broker HOST:PORT",
        )
    report, wire = read_earnings(state_dir)
    if args.accounting_key:
        try:
            report = open_report(wire, _key(args.accounting_key, "--accounting-key"))
        except MessageError as exc:
            raise RemoteError(f"the earnings report does not verify: {exc}") from None
    return report, wire


def _earnings_from_broker(args: argparse.Namespace) -> tuple[dict[str, Any], bytes]:
    relay = _relay_key(args)
    if relay is None and not args.relay:
        raise ConfigError(
            f"no relay identity in {args.state_dir}", "give the relay's --state-dir or --relay"
        )
    node_id = args.relay or node_id_of(relay)  # type: ignore[arg-type]
    if not args.broker:
        raise LocalError("earnings --relay needs --broker", "e.g. --broker 203.0.113.2:8883")
    if relay is None:
        raise ConfigError(
            f"no node identity in {args.state_dir}",
            "the broker admits enrolled nodes only: give an enrolled node's --state-dir",
        )
    broker = BrokerAddress.parse(args.broker)
    sd = Path(args.state_dir)
    tls = load_credentials(sd, load_identity(sd), role=None).context(broker.host)
    wire = asyncio.run(_fetch_retained(broker, earnings_topic(node_id), args.timeout, tls))
    if wire is None:
        raise RemoteError(
            f"no earnings report for {node_id} on the broker",
            "is `meshvpn accounting serve` running, and has this relay carried paid traffic?",
        )
    pinned = _key(args.accounting_key, "--accounting-key") if args.accounting_key else None
    try:
        report = open_report(wire, pinned)
    except MessageError as exc:
        raise RemoteError(f"the earnings report does not verify: {exc}") from None
    if report.get("node_id") != node_id:
        raise RemoteError("the earnings report is for another relay")
    return report, wire


def _print_report(report: dict[str, Any], pinned: bool) -> None:
    print(f"relay {report['node_id']}: balance {report['balance']:,} token units")
    print(
        f"{'epoch':>6}  {'':<8}{'gross':>14}{'fees':>12}{'emission':>14}{'net':>14}"
        f"{'paid bytes':>16}"
    )
    p = report["pending"]
    print(
        f"{p['epoch']:>6}  {'pending':<8}{p['gross']:>14,}{p['fee']:>12,}{'-':>14}"
        f"{p['net']:>14,}{p['paid_bytes']:>16,}"
    )
    for e in reversed(report["epochs"]):
        print(
            f"{e['epoch']:>6}  {'closed':<8}{e['gross']:>14,}{e['fee']:>12,}{e['emission']:>14,}"
            f"{e['net']:>14,}{e['paid_bytes']:>16,}"
        )
    claim = report.get("claim")
    if claim:
        print(
            f"claim: {claim['cumulative']:,} earned through epoch {claim['epoch']},"
            f" proof of {len(claim['proof'])} hash(es); `meshvpn earnings verify` checks it offline"
        )
    if not pinned:
        print(
            f"(signed by accounting key {report['accounting_key']}; pin it with --accounting-key)"
        )


def cmd_earnings_verify(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else Path(args.state_dir) / EARNINGS_FILE
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise LocalError(
            f"cannot read {path}: {exc.strerror}", "run `meshvpn earnings` first, or give --file"
        ) from None
    except ValueError:
        raise LocalError(f"{path} is not JSON") from None
    pinned = _key(args.accounting_key, "--accounting-key") if args.accounting_key else None
    result = verify_claim_data(data, pinned, _relay_key(args))
    if args.json:
        _print_json(result)
    elif result["ok"]:
        print(
            f"claim verified: relay {result['node_id']} earned {result['cumulative']:,} through"
            f" epoch {result['epoch']} (root {result['root'][:16]}…, signed by accounting key"
            f" {result['accounting_key']})"
        )
    else:
        print(f"claim does NOT verify: {result['reason']}")
    return 0 if result["ok"] else EXIT_UNVERIFIED


def verify_claim_data(
    data: dict[str, Any], accounting_key: PublicKey | None, relay: PublicKey | None
) -> dict[str, Any]:
    """Check a saved report (or a bare claim with ``accounting_key``) offline.

    A saved report: its signature, then its claim. The accounting key is the
    one given, else the report's own (then only the claim's consistency with
    that key is proven, not who holds it)."""

    def fail(reason: str) -> dict[str, Any]:
        return {"ok": False, "reason": reason}

    claim_json: Any = data
    key = accounting_key
    if "report" in data:
        try:
            report = open_report(json.dumps(data).encode(), accounting_key)
        except MessageError as exc:
            return fail(f"report: {exc}")
        claim_json = report.get("claim")
        key = key or PublicKey.from_b64(report["accounting_key"])
        if not claim_json:
            return fail("the report holds no claim yet (no epoch closed)")
    if key is None:
        return fail("no accounting key: give --accounting-key")
    try:
        claim = Claim.from_json(claim_json)
    except MessageError as exc:
        return fail(str(exc))
    if relay is not None and claim.relay != relay:
        return fail("the claim is for another relay than this state dir's")
    check = check_claim(claim, key)
    if not check.ok or check.statement is None:
        return fail(check.reason)
    return {
        "ok": True,
        "reason": check.reason,
        "node_id": node_id_of(claim.relay),
        "relay": claim.relay.b64,
        "epoch": claim.epoch,
        "cumulative": claim.cumulative,
        "root": check.statement.root.hex(),
        "accounting_key": key.b64,
    }


# ---- parsers


def _db_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        default=os.environ.get("MESHVPN_ACCOUNTING_DIR", str(DEFAULT_ACCOUNTING_DIR)),
        help="the service's key and, without --db, its SQLite ledger"
        " (default: $MESHVPN_ACCOUNTING_DIR or %(default)s)",
    )
    p.add_argument(
        "--db",
        default=os.environ.get("MESHVPN_ACCOUNTING_DB"),
        metavar="URL",
        help="postgresql://... for PostgreSQL, or an SQLite path"
        " (default: $MESHVPN_ACCOUNTING_DB or ledger.db in the state dir)",
    )


def add_parsers(sub: Any) -> None:  # noqa: ANN401 - argparse's private _SubParsersAction
    acct = sub.add_parser(
        "accounting",
        help="the accounting service: receipts in, balances, epochs and claims out",
        description="Verify receipts, keep the double-entry ledger, close epochs and publish"
        " signed rewards and claims.",
    )
    acct_sub = acct.add_subparsers(dest="accounting_command", required=True, metavar="COMMAND")
    p = acct_sub.add_parser("serve", help="run the service in the foreground (for systemd)")
    _db_flags(p)
    p.add_argument(
        "--broker",
        default="127.0.0.1:1883",
        metavar="HOST:PORT",
        help="the MQTT broker relays deliver receipts to (default: %(default)s)",
    )
    p.add_argument(
        "--epoch-seconds",
        type=float,
        default=3600.0,
        metavar="N",
        help="length of an epoch (default: %(default)s)",
    )
    p.add_argument(
        "--verify-workers",
        type=int,
        default=None,
        metavar="N",
        help="processes verifying receipts (default: one per core; 1: in the service itself)",
    )
    p.set_defaults(func=cmd_serve)
    p = acct_sub.add_parser(
        "deposit", help="credit a client's account (stands in for a chain bridge)"
    )
    _db_flags(p)
    p.add_argument("account", metavar="ACCOUNT", help="client:<node id>, a node id, or its key")
    p.add_argument("amount", metavar="AMOUNT", type=int, help="token units")
    p.add_argument("--ref", help="the bridge's transfer id: a deposit is booked once per ref")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_deposit)
    p = acct_sub.add_parser("balances", help="every account's balance, epochs, receipt counters")
    _db_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_balances)

    earn = sub.add_parser(
        "earnings",
        help="this relay's earnings per epoch, from the accounting service; `verify` its claim",
        description="Show this relay's signed earnings report (pending and closed epochs:"
        " gross, fees, emission, net): from the running relay agent, which follows it on the"
        " broker, or with --broker straight from the broker. It is saved in the state dir,"
        " where `meshvpn earnings verify` checks leaf, proof and signed root offline.",
    )
    earn_sub = earn.add_subparsers(dest="earnings_command", metavar="[verify]")
    for p in (earn, earn_sub.add_parser("verify", help="check the saved claim offline")):
        p.add_argument(
            "--state-dir",
            default=os.environ.get("MESHVPN_STATE_DIR", str(DEFAULT_STATE_DIR)),
            help="the relay's state dir (default: $MESHVPN_STATE_DIR or %(default)s)",
        )
        p.add_argument(
            "--accounting-key",
            metavar="KEY",
            help="the accounting service's identity key to trust (base64)",
        )
        p.add_argument("--json", action="store_true")
    earn.add_argument(
        "--broker",
        metavar="HOST:PORT",
        help="fetch the report from this broker (default: ask the running relay agent)",
    )
    earn.add_argument("--relay", metavar="NODE_ID", help="another relay's node id")
    earn.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the report")
    verify = earn_sub.choices["verify"]
    verify.add_argument("--file", help=f"a saved report or claim (default: {EARNINGS_FILE})")
    earn.set_defaults(func=cmd_earnings, earnings_command=None)
