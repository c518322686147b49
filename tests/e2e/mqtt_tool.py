"""A tiny MQTT client for tests, run inside a lab namespace as a script.

python mqtt_tool.py retained HOST PORT TOPIC     -> hex of the retained payload ('' if none)
python mqtt_tool.py publish HOST PORT FILE       -> publish [[topic, hex, retain], ...] from FILE
python mqtt_tool.py flood HOST PORT FILE         -> the same as one burst: no pacing, QoS 1,
                                                    up to 1000 in flight; prints count and seconds
"""

from __future__ import annotations

import json
import sys
import threading
import time

import paho.mqtt.client as mqtt


def retained(host: str, port: int, topic: str) -> str:
    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)

    def on_connect(c: mqtt.Client, *_: object) -> None:
        c.subscribe(topic, qos=1)

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            got.append(msg.payload)
            done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(host, port)
    client.loop_start()
    done.wait(1.5)
    client.loop_stop()
    client.disconnect()
    return got[-1].hex() if got else ""


def publish(host: str, port: int, path: str) -> int:
    items = json.loads(open(path).read())  # noqa: PTH123, SIM115
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    for topic, payload_hex, retain in items:
        info = client.publish(topic, bytes.fromhex(payload_hex), qos=1, retain=retain)
        info.wait_for_publish(10)
        # A sustained stream, not one burst: a burst past the broker's per-client
        # queue is dropped by the broker before any agent sees it.
        time.sleep(0.002)
    time.sleep(0.2)
    client.loop_stop()
    client.disconnect()
    return len(items)


def flood(host: str, port: int, path: str) -> str:
    items = json.loads(open(path).read())  # noqa: PTH123, SIM115
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(1000)
    client.connect(host, port)
    client.loop_start()
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
    cmd, host, port, arg = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if cmd == "retained":
        print(retained(host, port, arg))
    elif cmd == "flood":
        print(flood(host, port, arg))
    else:
        print(publish(host, port, arg))
