#!/usr/bin/env python3
"""Writes the committed seed corpora: fuzz/corpus/<target>/seed-<name>.

MQTT packets are assembled by hand from the 3.1.1 and 5.0 specs. Run from
anywhere: python3 fuzz/scripts/gen_seeds.py
"""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")

MQTT_SECRET = b"sl_fuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzz0"
PARENT = b"sl_fuzzParentfuzzParentfuzzParentfuzzParent0"
CHILD = b"sl_fuzzChildfuzzChildfuzzChildfuzzChildfuzz0"
INACTIVE = b"sl_fuzzInactivefuzzInactivefuzzInactivefuz0"
ROOT_TOK = b"sl_fuzzRootfuzzRootfuzzRootfuzzRootfuzzRoot0"


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- MQTT -----------------------------------------------------------------

def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            b |= 0x80
        out.append(b)
        if not n:
            return bytes(out)


def s(b):
    if isinstance(b, str):
        b = b.encode()
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def props(*ps):
    body = b"".join(ps)
    return varint(len(body)) + body


def connect(level, client_id, password=MQTT_SECRET, username="dev", clean=True,
            keep_alive=30, will=None, cprops=b"", wprops=b""):
    flags = 0
    if clean:
        flags |= 0x02
    if will:
        flags |= 0x04 | (will[2] << 3)
    if password is not None:
        flags |= 0x40
    if username is not None:
        flags |= 0x80
    vh = s("MQTT") + bytes([level, flags]) + struct.pack(">H", keep_alive)
    if level == 5:
        vh += props(cprops)
    pl = s(client_id)
    if will:
        if level == 5:
            pl += props(wprops)
        pl += s(will[0]) + s(will[1])
    if username is not None:
        pl += s(username)
    if password is not None:
        pl += s(password)
    return packet(0x10, vh + pl)


def publish(level, topic, payload, qos=0, pkid=1, dup=False, retain=False, pprops=b""):
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = s(topic)
    if qos:
        body += struct.pack(">H", pkid)
    if level == 5:
        body += props(pprops)
    if isinstance(payload, str):
        payload = payload.encode()
    return packet(first, body + payload)


def subscribe(level, pkid, filters):
    body = struct.pack(">H", pkid)
    if level == 5:
        body += props(b"")
    for f, o in filters:
        body += s(f) + bytes([o])
    return packet(0x82, body)


def unsubscribe(level, pkid, filters):
    body = struct.pack(">H", pkid)
    if level == 5:
        body += props(b"")
    for f in filters:
        body += s(f)
    return packet(0xA2, body)


PING = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
T1 = "applications/app/devices/dev1/state"
T2 = "applications/app/devices/dev-2/state"
TBAD = "applications/app/devices/other/state"
GOOD = '{"data":{"temp":21.5,"on":true},"time":"2026-11-28T09:00:00Z"}'
GOOD2 = '{"data":{"flow":12.5,"tags":["a",{"b":null}]},"time":1700000000000}'


def mqtt_seeds():
    u32 = lambda tag, v: bytes([tag]) + struct.pack(">I", v)
    u16 = lambda tag, v: bytes([tag]) + struct.pack(">H", v)
    seeds = {
        "v311-publish-qos0": connect(4, "dev1") + publish(4, T1, GOOD) + DISCONNECT,
        "v311-publish-qos1": connect(4, "dev1") + publish(4, T1, GOOD, qos=1, pkid=7)
        + publish(4, T2, GOOD2, qos=1, pkid=8) + PING + DISCONNECT,
        "v311-refused-device": connect(4, "c") + publish(4, TBAD, GOOD, qos=1),
        "v311-bad-payload": connect(4, "c") + publish(4, T1, '{"data":{}}', qos=1),
        "v311-qos2": connect(4, "c") + publish(4, T1, GOOD, qos=2),
        "v311-subscribe": connect(4, "c") + subscribe(4, 3, [("a/#", 1), ("b/+", 0)])
        + unsubscribe(4, 4, ["a/#"]) + PING,
        "v311-will-no-password": connect(4, "", password=None, username=None,
                                         will=("w/t", "bye", 1)) + PING,
        "v311-empty-id-persistent": connect(4, "", clean=False),
        "v31-mqisdp": packet(0x10, s("MQIsdp") + bytes([3, 0xC2]) + struct.pack(">H", 10)
                             + s("old") + s("u") + s(MQTT_SECRET)) + PING,
        "v311-puback-from-client": connect(4, "c") + b"\x40\x02\x00\x01",
        "v311-retain-dup": connect(4, "c") + publish(4, T2, GOOD2, qos=1, pkid=9, dup=True, retain=True),
        "v5-publish-qos0": connect(5, "dev1") + publish(5, T1, GOOD) + DISCONNECT,
        "v5-publish-qos1-props": connect(
            5, "dev1",
            cprops=u32(0x11, 3600) + u16(0x21, 10) + u32(0x27, 1024) + u16(0x22, 5)
            + b"\x17\x01" + b"\x26" + s("k") + s("v"),
        ) + publish(5, T1, GOOD, qos=1, pkid=5,
                    pprops=b"\x01\x01" + u32(0x02, 60) + b"\x03" + s("application/json")
                    + b"\x08" + s("resp") + b"\x09" + s("corr") + b"\x26" + s("a") + s("b"))
        + PING + DISCONNECT,
        "v5-topic-alias": connect(5, "dev1", cprops=u16(0x22, 5))
        + publish(5, T1, GOOD, qos=1, pkid=1, pprops=u16(0x23, 1))
        + publish(5, "", GOOD2, qos=1, pkid=2, pprops=u16(0x23, 1)),
        "v5-will": connect(5, "w", will=("w/t", "bye", 0), wprops=u32(0x18, 5) + b"\x01\x01")
        + publish(5, T2, GOOD),
        "v5-subscribe": connect(5, "s") + subscribe(5, 1, [("#", 0x2d)]) + unsubscribe(5, 2, ["#", "x"]),
        "v5-tiny-max-packet": connect(5, "", cprops=u32(0x27, 8)) + subscribe(5, 1, [("a", 0)] * 20),
        "v5-auth-method": connect(5, "a", cprops=b"\x15" + s("SCRAM") + b"\x16" + s("data"))
        + b"\xf0\x00",
        "v5-disconnect-reason": connect(5, "d") + publish(5, T1, GOOD) + b"\xe0\x02\x04\x00",
        "v5-bad-password": connect(5, "d", password=b"nope") + publish(5, T1, GOOD, qos=1),
        "v5-qos2": connect(5, "d") + publish(5, T1, GOOD, qos=2, pkid=3),
        "v5-oversize": connect(5, "d") + b"\x30\xff\xff\xff\x7f",
        "v311-unsupported-level": connect(3, "old") + publish(4, T1, GOOD),
        "v6-unsupported-level": connect(6, "new") + publish(5, T1, GOOD),
        "v5-empty-id-persistent": connect(5, "", clean=False) + publish(5, T1, GOOD, qos=1) + PING,
        "v5-retain": connect(5, "r") + publish(5, T1, GOOD, qos=1, retain=True),
        "v5-subscription-id": connect(5, "r") + publish(5, T1, GOOD, pprops=b"\x0b\x01"),
        "v5-connect-too-large": connect(5, "big", cprops=b"\x26" + s("k") + s("v" * 5000)),
        "v5-disconnect-session-expiry": connect(5, "d") + b"\xe0\x07\x00\x05" + u32(0x11, 10),
        "garbage-http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "publish-before-connect": publish(4, T1, GOOD),
    }
    for i, (name, stream) in enumerate(sorted(seeds.items())):
        # Alternate one-read, split and small-read deliveries.
        ctl = [0x00, 0x40, 0x80, 0x83, 0x9f][i % 5]
        write("mqtt_packet", name, bytes([ctl]) + stream)


# --- state JSON --------------------------------------------------------------

def state_seeds():
    seeds = {
        "one": GOOD,
        "one-epoch": GOOD2,
        "one-null-time": '{"data":{"a":1},"time":null}',
        "no-time": '{"data":{"a":"x","b":[1,2,{"c":{}}]}}',
        "array": '[{"data":{"a":1,"b":1},"time":"1970-01-01T00:00:02Z"},{"data":{"a":2},"time":1000},{"data":{"b":"x"}}]',
        "escaped-names": '{"data":{"\\u0074emp":1,"t\\"q":2,"\\ud83d\\ude00":3}}',
        "offset-time": '{"time":"2017-06-13T06:00:00.123+02:00","data":{"x":-1.5e3}}',
        "whitespace": ' \n { "time" : 5 , "data" : { "a" : { "b" : [ ] } } } \t',
        "dup-attr": '{"data":{"a":1,"a":2}}',
        "dup-data": '{"data":{"a":1},"data":{"b":1}}',
        "unknown-field": '{"data":{"a":1},"x":2}',
        "empty-data": '{"data":{}}',
        "data-not-object": '{"data":[1]}',
        "bad-time": '{"data":{"a":1},"time":"soon"}',
        "float-time": '{"data":{"a":1},"time":1.5}',
        "max-time": '{"data":{"a":1},"time":253402300799999}',
        "deep": '{"data":{"a":' + "[" * 31 + "1" + "]" * 31 + "}}",
        "tricky-strings": '{"data":{"a":"[[[[\\"[[[[","b":[{"c":"}}}"}]}}',
        "many-attrs": '{"data":{' + ",".join('"k%d":%d' % (i, i) for i in range(20)) + "}}",
        "array-empty": "[]",
        "trailing": '{"data":{"a":1}} x',
        "control-name": '{"data":{"a\\u0000b":1}}',
    }
    for name, body in seeds.items():
        write("state_json", name, body)
    write("state_json", "bad-utf8", b'{"data":{"a":"\xff"}}')


# --- token secrets --------------------------------------------------------------

def token_seeds():
    seeds = {
        "bearer-parent": b"Bearer " + PARENT,
        "bearer-child-lower": b"\x01bearer  " + CHILD + b" ",
        "child-raw-other-app": b"\x12" + CHILD,
        "bearer-inactive": b"Bearer " + INACTIVE,
        "root-raw": ROOT_TOK,
        "basic": b"Basic dXNlcjpwYXNz",
        "bearer-empty": b"Bearer ",
        "bearer-space-inside": b"Bearer a b",
        "hex-hash": b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "hex-upper": b"BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
        "expired-parent": b"\x40" + PARENT,
    }
    for name, data in seeds.items():
        write("token_secret", name, data)


# --- admin JSON ---------------------------------------------------------------

def admin_seeds():
    create = [
        '{"name":"backend","scope":["device.sendState","device.getState","token.create"]}',
        '{"name":"pump-1","scope":["device.sendState"],"devices":["pump-1","pump-2"],"expirationDate":"2030-01-01T00:00:00Z","status":"inactive","rateLimit":{"perSecond":5,"burst":10}}',
        '{"name":"all","scope":["all.Application"],"devices":["*"],"expirationDate":1900000000000}',
        '{"name":"x","scope":["token.read","token.revoke"],"devices":["a","b","c","d","e"],"expirationDate":null}',
        '{"name":"x","scope":["nope"]}',
        '{"name":"","scope":[]}',
        '{"name":"x","scope":["device.sendState"],"rateLimit":{"perSecond":0,"burst":1}}',
        '{"name":"x","scope":["device.sendState"],"devices":["*","a"]}',
        '{"name":"x","scope":["device.sendState"],"extra":1}',
    ]
    for i, b in enumerate(create):
        write("admin_json", "create-%d" % i, bytes([0x00 if i % 2 == 0 else 0x81]) + b.encode())
    update = ['{"status":"inactive"}', '{"name":"renamed","status":"active"}', '{}', '{"status":"deleted"}']
    for i, b in enumerate(update):
        write("admin_json", "update-%d" % i, b"\x01" + b.encode())
    query = [
        "start=1497326400000&end=2017-06-13T05:00:00Z&limit=10&order=asc",
        "cursor=0000018cd2a7c8000000000000000007&order=desc",
        "cursor=0000018CD2A7C8000000000000000007",
        "limit=0",
        "start=5&end=4",
        "bogus=1",
    ]
    for i, q in enumerate(query):
        write("admin_json", "query-%d" % i, b"\x02" + q.encode())


# --- time ---------------------------------------------------------------------

def time_seeds():
    texts = [
        "1970-01-01T00:00:01Z",
        "2017-06-13T04:00:00.000Z",
        "2017-06-13T06:00:00+02:00",
        "9999-12-31T23:59:59.999Z",
        "1969-12-31T23:59:59Z",
        "2026-02-29T00:00:00Z",
        "2024-02-29T12:34:56.123456789-23:59",
        "1497326400000",
        "253402300799999",
        "99999999999999999999",
        "2017-06-13",
        "-5",
    ]
    for i, t in enumerate(texts):
        write("time_parse", "text-%d" % i, t)
    for i, ms in enumerate([0, 1497326400000, 253402300799999, -1, 2**63 - 1]):
        write("time_parse", "ms-%d" % i, struct.pack("<q", ms))


# --- composite ----------------------------------------------------------------

def entry(name, t, value):
    return struct.pack(">H", len(name)) + name + struct.pack(">Q", t) + struct.pack(">I", len(value)) + value


def composite_seeds():
    a = entry(b"hum", 10, b"50") + entry(b"temp", 10, b"1")
    b = entry(b"temp", 5, b"2") + entry(b"hum", 10, b"51") + entry(b"x", 1, b"true")
    write("composite", "two-parts", bytes([1, len(a)]) + a + b)
    write("composite", "one-part", b"\x00" + a)
    write("composite", "truncated", b"\x00" + a[:-1])
    write("composite", "three-parts", bytes([2, len(a), len(b)]) + a + b + entry(b"hum", 10, b"52"))
    write("composite", "huge-lengths", b"\x00" + b"\xff\xff" + b"n" * 10 + b"\xff" * 12)


if __name__ == "__main__":
    mqtt_seeds()
    state_seeds()
    token_seeds()
    admin_seeds()
    time_seeds()
    composite_seeds()
