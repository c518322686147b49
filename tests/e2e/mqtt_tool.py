"""A tiny MQTT client for tests, run inside a lab namespace as a script.

    python mqtt_tool.py [OPTIONS] HOST PORT COMMAND [ARG...]

    retained TOPIC           hex of the retained payload ('' if none)
    publish FILE             publish [[topic, hex, retain], ...] from FILE; print the PUBACK codes
    flood FILE               the same as one burst: no pacing, QoS 1, up to 1000 in
                             flight; prints {"published": n, "seconds": s}
    watch STOPFILE FILTER... {"suback": [codes], "messages": [[topic, hex, retain], ...]}
                             once STOPFILE exists (at most WATCH_MAX seconds)
    connect                  {"connack": code or null, "error": "..."}
    clear CLIENT_ID          end CLIENT_ID's persistent session: the broker drops what it
                             queued for it (any enrolled node can, knowing the id)

It connects over TLS as the node whose state directory ``--state-dir`` names,
with the very context the agents use (``meshvpn.mqtt.BrokerCredentials``).
The other options make it a worse client on purpose: ``--no-cert`` (TLS, no
client certificate), ``--plain`` (no TLS), ``--tls12``, ``--ca FILE`` (trust
only that CA for the broker), ``--server-name`` (expect another name),
``--username`` (claim a username in CONNECT), ``--key-cert KEY CERT`` (a
certificate from elsewhere). ``--v5`` speaks MQTT 5, so PUBACK and SUBACK carry reason codes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from meshvpn.identity import load_identity
from meshvpn.mqtt import load_credentials

CONNECT_WAIT = 5.0
WATCH_MAX = 180.0


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.plain:
        return None
    name = args.server_name or args.host
    state = Path(args.state_dir)
    if args.no_cert or args.key_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(args.ca or state / "broker-ca.crt"))
        if args.key_cert:
            ctx.load_cert_chain(args.key_cert[1], args.key_cert[0])
    else:
        creds = load_credentials(state, load_identity(state), role=None)
        if args.ca:
            creds = dataclasses.replace(creds, ca=Path(args.ca))  # trust that CA instead
        ctx = creds.context(name)
    if args.tls12:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def make_client(args: argparse.Namespace, **kwargs: Any) -> mqtt.Client:
    protocol = mqtt.MQTTv5 if args.v5 else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol, **kwargs)
    ctx = tls_context(args)
    if ctx is not None:
        client.tls_set_context(ctx)
    if args.username:
        client.username_pw_set(args.username)
    return client


def connect(args: argparse.Namespace, client: mqtt.Client) -> ReasonCode | None:
    """Connect; the CONNACK's reason code, or None if the broker never sent one."""
    acked = threading.Event()
    result: list[ReasonCode] = []

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        result.append(rc)
        acked.set()

    client.on_connect = on_connect
    client.connect(args.host, args.port)
    client.loop_start()
    acked.wait(CONNECT_WAIT)
    return result[0] if result else None


def retained(args: argparse.Namespace) -> str:
    got: list[bytes] = []
    done = threading.Event()
    client = make_client(args)

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            got.append(msg.payload)
            done.set()

    client.on_message = on_message
    rc = connect(args, client)
    assert rc is not None and not rc.is_failure, f"not connected: {rc}"
    client.subscribe(args.arg[0], qos=1)
    done.wait(1.5)
    client.loop_stop()
    client.disconnect()
    return got[-1].hex() if got else ""


def publish(args: argparse.Namespace) -> str:
    items = json.loads(Path(args.arg[0]).read_text())
    client = make_client(args)
    client.max_queued_messages_set(0)
    codes: dict[int, int] = {}

    def on_publish(_c: mqtt.Client, _u: object, mid: int, rc: ReasonCode, _p: object) -> None:
        codes[mid] = rc.value

    client.on_publish = on_publish
    rc = connect(args, client)
    assert rc is not None and not rc.is_failure, f"not connected: {rc}"
    mids = []
    for topic, payload_hex, retain in items:
        info = client.publish(topic, bytes.fromhex(payload_hex), qos=1, retain=retain)
        info.wait_for_publish(10)
        mids.append(info.mid)
        # A sustained stream, not one burst: a burst past the broker's per-client
        # queue is dropped by the broker before any agent sees it.
        time.sleep(0.002)
    time.sleep(0.2)
    client.loop_stop()
    client.disconnect()
    return json.dumps([codes.get(m) for m in mids])


def watch(args: argparse.Namespace) -> str:
    stop, filters = Path(args.arg[0]), args.arg[1:]
    got: list[list[Any]] = []
    suback: list[int] = []
    subscribed = threading.Event()
    client = make_client(args)

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.append([msg.topic, msg.payload.hex(), bool(msg.retain)])

    def on_subscribe(
        _c: mqtt.Client, _u: object, _m: int, rcs: list[ReasonCode], _p: object
    ) -> None:
        suback.extend(rc.value for rc in rcs)
        subscribed.set()

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    rc = connect(args, client)
    assert rc is not None and not rc.is_failure, f"not connected: {rc}"
    client.subscribe([(f, 1) for f in filters])
    subscribed.wait(5)
    print("subscribed", flush=True)  # the test starts its traffic now
    deadline = time.monotonic() + WATCH_MAX
    while not stop.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # what was on its way when the test said stop
    client.loop_stop()
    client.disconnect()
    return json.dumps({"suback": suback, "messages": got})


def try_connect(args: argparse.Namespace) -> str:
    try:
        client = make_client(args)
        rc = connect(args, client)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        return json.dumps({"connack": None, "error": f"{type(exc).__name__}: {exc}"})
    client.loop_stop()
    if rc is not None and not rc.is_failure:
        client.disconnect()
    return json.dumps({"connack": None if rc is None else rc.value, "error": ""})


def clear(args: argparse.Namespace) -> str:
    client = make_client(args, client_id=args.arg[0], clean_session=True)
    rc = connect(args, client)
    assert rc is not None and not rc.is_failure, f"not connected: {rc}"
    time.sleep(0.5)
    client.loop_stop()
    client.disconnect()
    return str(args.arg[0])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--state-dir")
    p.add_argument("--no-cert", action="store_true")
    p.add_argument("--plain", action="store_true")
    p.add_argument("--tls12", action="store_true")
    p.add_argument("--ca")
    p.add_argument("--server-name")
    p.add_argument("--username")
    p.add_argument("--key-cert", nargs=2, metavar=("KEY", "CERT"))
    p.add_argument("--v5", action="store_true")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("command", choices=["retained", "publish", "flood", "watch", "connect", "clear"])
    p.add_argument("arg", nargs="*")
    args = p.parse_args()
    commands = {
        "retained": retained,
        "publish": publish,
        "flood": flood,
        "watch": watch,
        "connect": try_connect,
        "clear": clear,
    }
    print(commands[args.command](args))


def flood(args: argparse.Namespace) -> str:
    items = json.loads(Path(args.arg[0]).read_text())
    client = make_client(args)
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(1000)
    rc = connect(args, client)
    assert rc is not None and not rc.is_failure, f"not connected: {rc}"
    started = time.monotonic()
    infos = [
        client.publish(topic, bytes.fromhex(payload_hex), qos=1, retain=retain)
        for topic, payload_hex, retain in items
    ]
    for info in infos:
        info.wait_for_publish(60)
    elapsed = time.monotonic() - started
    client.loop_stop()
    client.disconnect()
    return json.dumps({"published": sum(i.is_published() for i in infos), "seconds": elapsed})


if __name__ == "__main__":
    main()
