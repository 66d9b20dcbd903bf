"""Runs a whole queue lifecycle against a running relay with the Python client (relay_client.py),
printing one "PASS name" or "FAIL name: why" line per check.

    /usr/bin/python3 lifecycle.py relay://<fp>@127.0.0.1:5223            # TLS, pinned
    /usr/bin/python3 lifecycle.py relay://<fp>@127.0.0.1:5223 --plain    # plain-TCP relay
    /usr/bin/python3 lifecycle.py ADDRESS --plain --transcript FILE      # also write an annotated hex transcript
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import time

import relay_client as rc
from checks import Checks

check = Checks()


def expect_error(name: str, code: str, fn) -> None:
    def run():
        try:
            fn()
        except rc.RelayError as e:
            assert e.name == code, f"expected ERR {code}, got ERR {e.name}"
            return True
        raise AssertionError(f"expected ERR {code}, got success")
    check(name, run)


# ---- the annotated transcript (docs/PROTOCOL.md Appendix A) -------------------------------------

def _hex(b: bytes) -> str:
    return b.hex()


QUEUE_ARGS = {rc.SKEY: [("senderKey", 32)], rc.SEND: [("flags", 1), ("body", None)], rc.ACK: [("msgId", 8)]}


def fields(frame: rc.Frame, direction: str) -> list[tuple[str, bytes]]:
    p = frame.payload
    t = frame.type

    def take(layout):
        out, i = [], 0
        for name, size in layout:
            n = len(p) - i - sum(s for _, s in layout[layout.index((name, size)) + 1:] if s) if size is None else size
            out.append((name, p[i:i + n]))
            i += n
        return out

    if t == rc.HELLO:
        return take([("minVersion", 2), ("maxVersion", 2)])
    if t == rc.WELCOME:
        return take([("version", 2), ("maxFrame", 4), ("maxMessage", 4), ("sessionId", 32), ("sessionKey", 32)])
    if t == rc.NEW:
        return take([("recipientKey", 32), ("recipientDhKey", 32), ("passwordLength", 1), ("password", None)])
    if t == rc.IDS:
        return take([("recipientId", 24), ("senderId", 24), ("serverDhKey", 32)])
    if t in (rc.SKEY, rc.SEND, rc.SUB, rc.ACK, rc.GET, rc.OFF, rc.DEL) and direction == "C->S":
        qid = "senderId" if t in (rc.SKEY, rc.SEND) else "recipientId"
        return take([(qid, 24)] + QUEUE_ARGS.get(t, []) + [("mac", 16)])
    if t == rc.MSG:
        return take([("recipientId", 24), ("msgId", 8), ("nonce", 12), ("sealed", None), ("tag", 16)])
    if t == rc.ERR:
        return take([("code", 1)] + ([("min", 2), ("max", 2)] if len(p) == 5 else []))
    if t == rc.END:
        return take([("recipientId", 24)])
    return take([("payload", None)]) if p else []


def describe(name: str, value: bytes) -> str:
    if name in ("minVersion", "maxVersion", "version", "maxFrame", "maxMessage", "passwordLength", "msgId", "flags", "min", "max"):
        return f"{name} = {int.from_bytes(value, 'big')}"
    if name == "code":
        return f"code = 0x{value[0]:02x} {rc.ERROR_NAMES.get(value[0], '?')}"
    if name == "body":
        return f'body = "{value.decode(errors="replace")}"'
    if name == "password":
        return f"password ({len(value)} bytes)"
    if name == "sealed":
        return f"sealed: ChaCha20-Poly1305 ciphertext of hour ‖ flags ‖ body ({len(value)} bytes)"
    return name


class Transcript:
    def __init__(self, path: str):
        self.out = open(path, "w", encoding="utf-8")  # noqa: SIM115

    def note(self, text: str) -> None:
        for line in text.splitlines():
            self.out.write(f"# {line}\n")

    def frame(self, direction: str, frame: rc.Frame, note: str) -> None:
        arrow = "C→S" if direction == "C->S" else "S→C"
        extra = " (push)" if frame.corr == 0 and direction == "S->C" and frame.type in (rc.MSG, rc.END) else ""
        self.out.write(f"{arrow} {frame.name}{extra}{'  ' + note if note else ''}\n")
        self.out.write(f"  {_hex(frame.wire)}\n")
        rows = [(frame.wire[0:4], f"length = {len(frame.wire) - 4}"),
                (frame.wire[4:5], f"type = 0x{frame.type:02x} {frame.name}"),
                (frame.wire[5:9], f"corr = {frame.corr}")]
        rows += [(v, describe(n, v)) for n, v in fields(frame, direction)]
        for value, label in rows:
            h = _hex(value)
            chunks = [h[i:i + 64] for i in range(0, len(h), 64)] or [""]
            self.out.write(f"    {chunks[0]:<64}  {label}\n")
            for c in chunks[1:]:
                self.out.write(f"    {c}\n")
        self.out.write("\n")
        self.out.flush()


def transcript_run(address: str, plain: bool, path: str) -> None:
    """One exchange of each command, logged frame by frame with every key needed to recompute it."""
    tx = Transcript(path)
    c = rc.Connection.connect(address, tls=not plain, log=tx.frame)
    tx.note(f"sessionId  = {c.session_id.hex()}\nsessionKey = {c.session_key.hex()}  (server X25519 public key)")
    c.ping()

    recipient_private, recipient_public = rc.new_keypair()
    dh_private, dh_public = rc.new_keypair()
    tx.note(f"recipient key:    private {recipient_private.hex()}\n                  public  {recipient_public.hex()}\n"
            f"recipient DH key: private {dh_private.hex()}\n                  public  {dh_public.hex()}")
    ids = c.expect(c.request(rc.NEW, recipient_public + dh_public + b"\x00"), rc.IDS, "NEW").payload
    q = rc.Queue(ids[:24], ids[24:48], recipient_private, dh_private, ids[48:80],
                 rc.delivery_key(dh_private, ids[48:80], ids[:24]))
    dh_shared = rc.x25519_shared(dh_private, q.server_dh_key)
    tx.note(f"dhShared    = X25519(recipientDhPrivate, serverDhKey) = {dh_shared.hex()}\n"
            f"deliveryKey = HKDF-SHA256(dhShared, salt = recipientId, info = \"relay/1 delivery\") = {q.delivery_key.hex()}")

    sender_private, sender_public = rc.new_keypair()
    shared = rc.x25519_shared(sender_private, c.session_key)
    tx.note(f"sender key: private {sender_private.hex()}\n            public  {sender_public.hex()}\n"
            f"shared  = X25519(senderPrivate, sessionKey) = {shared.hex()}\n"
            f"authKey = HKDF-SHA256(shared, salt = sessionId, info = \"relay/1 auth\") = {c.auth_key(sender_private).hex()}\n"
            "mac = HMAC-SHA256(authKey, frame bytes from type to the end of args)[0..16]")
    c.secure(q.sender_id, sender_private)
    c.send(q.sender_id, b"hello", sender_private)

    r_shared = rc.x25519_shared(recipient_private, c.session_key)
    tx.note(f"recipient commands: shared  = X25519(recipientPrivate, sessionKey) = {r_shared.hex()}\n"
            f"                    authKey = {c.auth_key(recipient_private).hex()}")
    c.subscribe(q)
    push = c.next_push()
    d = rc.open_delivery(q, push.payload)
    tx.note(f"ChaCha20-Poly1305-open(key = deliveryKey, nonce, aad = recipientId ‖ msgId, sealed ‖ tag)\n"
            f"  = {struct.pack('>IB', d.hour, d.flags).hex()} {d.body.hex()}: hour = {d.hour}, flags = {d.flags}, body = \"{d.body.decode()}\"")
    c.ack(q, d.msg_id)

    c.send(q.sender_id, b"again", sender_private)
    # The subscription pushes "again" (corr 0) right after its OK; GET answers the same message with its own corr.
    c.next_push()
    got = c.get(q)
    tx.note(f"GET answer opened: msgId = {got.msg_id}, hour = {got.hour}, flags = {got.flags}, body = \"{got.body.decode()}\"\n"
            f"(the same message as the push before it, sealed again under a fresh nonce: the two MSG frames differ)")
    c.ack(q, got.msg_id)
    assert c.get(q) is None
    c.suspend(q)
    try:
        c.send(q.sender_id, b"refused", sender_private)
    except rc.RelayError:
        pass
    c.delete(q)
    c.close()
    tx.out.close()


# ---- the lifecycle checks ---------------------------------------------------------------------------

def run(address: str, plain: bool) -> None:
    tls = not plain
    addr = rc.Address.parse(address)

    if tls:
        def wrong_fingerprint():
            other = address.replace(addr.fingerprint, rc.b64url(rc.random_bytes(32)))
            try:
                rc.Connection.connect(other, tls=True).close()
            except rc.FingerprintMismatch:
                return True
            raise AssertionError("connected despite a wrong fingerprint")
        check("TLS: a wrong fingerprint is refused by the client", wrong_fingerprint)

    c = check("TLS 1.3 + ALPN relay/1 + pinned fingerprint, HELLO/WELCOME" if tls else "HELLO/WELCOME (plain TCP)",
              lambda: rc.Connection.connect(address, tls=tls))
    if c is None:
        return
    check("WELCOME: version 1, maxFrame 65536, maxMessage 65000",
          lambda: (c.version, c.max_frame, c.max_message) == (1, 65536, 65000) or (_ for _ in ()).throw(AssertionError((c.version, c.max_frame, c.max_message))))
    check("PING/PONG", c.ping)
    q = check("NEW/IDS: two unrelated ids and a delivery key", lambda: c.new_queue())
    if q is None:
        return
    check("ids differ", lambda: q.recipient_id != q.sender_id)
    check("SEND before SKEY needs no MAC", lambda: c.send(q.sender_id, b"first, unsecured"))

    sender_private, _ = rc.new_keypair()
    check("SKEY/OK", lambda: c.secure(q.sender_id, sender_private))
    check("SKEY again with the same key: OK", lambda: c.secure(q.sender_id, sender_private))
    expect_error("SKEY with another key: AUTH", "AUTH", lambda: c.secure(q.sender_id, rc.new_keypair()[0]))
    check("SEND with the sender's MAC: OK", lambda: c.send(q.sender_id, b"second, secured", sender_private))
    expect_error("SEND without MAC on a secured queue: AUTH", "AUTH", lambda: c.send(q.sender_id, b"x"))
    expect_error("SEND body over maxMessage: TOO_LARGE", "TOO_LARGE", lambda: c.send(q.sender_id, bytes(c.max_message + 1), sender_private))

    check("SUB/OK", lambda: c.subscribe(q))
    first = check("MSG push opens with the delivery key", lambda: rc.open_delivery(q, c.next_push().payload))
    if first is not None:
        check("first message body and hour", lambda: first.body == b"first, unsecured" and abs(first.hour - int(time.time() // 3600)) <= 1)
        expect_error("ACK of another id: NO_MSG", "NO_MSG", lambda: c.ack(q, first.msg_id + 1))
        check("ACK/OK", lambda: c.ack(q, first.msg_id))
        second_push = check("ACK releases the next push", lambda: c.next_push())
        if second_push is not None:
            second = rc.open_delivery(q, second_push.payload)
            check("second message body, increasing id", lambda: second.body == b"second, secured" and second.msg_id > first.msg_id)
            check("delivered bytes never contain the uploaded body", lambda: b"second, secured" not in second_push.wire)
            check("ACK second", lambda: c.ack(q, second.msg_id))

    check("GET/EMPTY on an empty queue", lambda: c.get(q) is None)

    # Another connection: the session-bound MAC and the takeover.
    c2 = rc.Connection.connect(address, tls=tls)
    replay = c.queue_frame(rc.GET, 4242, q.recipient_id, b"", q.recipient_private)

    def replayed():
        c2.send_raw(replay)
        f = c2.wait_for(4242)
        assert f.type == rc.ERR and f.payload == b"\x03", f"expected ERR AUTH, got {f.name} {f.payload.hex()}"
    check("a command captured on one connection fails on another: AUTH", replayed)
    check("second subscriber: SUB/OK", lambda: c2.subscribe(q))

    def first_gets_end():
        f = c.next_push()
        assert f.type == rc.END and f.payload == q.recipient_id, f"expected END, got {f.name}"
    check("takeover: the first subscriber gets END", first_gets_end)
    check("SEND while the second connection subscribes", lambda: c.send(q.sender_id, b"third", sender_private))

    def second_gets_it():
        d = rc.open_delivery(q, c2.next_push().payload)
        assert d.body == b"third"
        return d
    third = check("the delivery goes to the new subscriber", second_gets_it)
    got = check("GET/MSG returns the outstanding message", lambda: c.get(q))
    if third is not None and got is not None:
        check("GET and push carry the same id", lambda: got.msg_id == third.msg_id and got.body == b"third")
        check("ACK from the polling connection", lambda: c.ack(q, got.msg_id))

    # A delivery window: three outstanding before any ACK, ACKs in delivery order.
    w = check("NEW/IDS for the window checks", lambda: c.new_queue())
    if w is not None:
        for i in range(4):
            c.send(w.sender_id, b"w%d" % i)
        check("SUB with window 3: OK", lambda: c.subscribe(w, window=3))
        pushed = [check(f"window push {i + 1} of 3", lambda: rc.open_delivery(w, c.next_push().payload)) for i in range(3)]

        def no_fourth():
            c.ping()   # the relay wrote every push it was going to before this PONG
            assert not c.pushes, f"{len(c.pushes)} more pushed past the window"
        check("the window holds: no fourth push before an ACK", no_fourth)
        if all(p is not None for p in pushed):
            check("window pushes in order", lambda: [p.body for p in pushed] == [b"w0", b"w1", b"w2"])
            expect_error("ACK of the second before the first: NO_MSG", "NO_MSG", lambda: c.ack(w, pushed[1].msg_id))
            check("ACK of the first: OK", lambda: c.ack(w, pushed[0].msg_id))
            fourth = check("the ACK releases the fourth", lambda: rc.open_delivery(w, c.next_push().payload))
            check("fourth body", lambda: fourth is not None and fourth.body == b"w3")
            if fourth is not None:
                expect_error("ACK through a message not pushed: NO_MSG", "NO_MSG", lambda: c.ack(w, fourth.msg_id + 1, through=True))
                check("one ACK through the fourth covers the three outstanding", lambda: c.ack(w, fourth.msg_id, through=True))
            check("window queue drained: GET/EMPTY", lambda: c.get(w) is None)

    def unknown_command():
        f = c.request(0x7F, b"\x00" * 8)
        assert f.type == rc.ERR and f.payload == b"\x0a", f"got {f.name} {f.payload.hex()}"
    check("unknown command: ERR CMD", unknown_command)
    check("the connection goes on: PING", c.ping)

    check("OFF/OK", lambda: c.suspend(q))
    expect_error("SEND to a suspended queue: AUTH", "AUTH", lambda: c.send(q.sender_id, b"x", sender_private))
    check("DEL/OK", lambda: c.delete(q))

    def deleted_end():
        f = c2.next_push()
        assert f.type == rc.END and f.payload == q.recipient_id, f"expected END, got {f.name}"
    check("DEL ends the other connection's subscription with END", deleted_end)
    expect_error("GET on a deleted queue: AUTH", "AUTH", lambda: c.get(q))
    expect_error("GET on an id that never existed: AUTH", "AUTH",
                 lambda: c.get(rc.Queue(rc.random_bytes(24), b"", q.recipient_private, b"", b"", b"")))
    c.close()
    c2.close()

    def version_error():
        raw = _raw_connect(address, tls)
        raw.sendall(rc.encode_frame(rc.HELLO, 0, struct.pack(">HH", 2, 3)))
        data = _read_all(raw)
        assert data == rc.encode_frame(rc.ERR, 0, b"\x02\x00\x01\x00\x01"), data.hex()
    check("HELLO 2..3: ERR VERSION 1..1, closed", version_error)

    def too_large():
        conn = rc.Connection.connect(address, tls=tls)
        conn.sock.sendall(struct.pack(">I", conn.max_frame + 1))
        data = _read_all(conn.sock)
        assert data == rc.encode_frame(rc.ERR, 0, b"\x06"), data.hex()
    check("frame length over maxFrame: ERR TOO_LARGE, closed, body not awaited", too_large)


def _raw_connect(address: str, tls: bool) -> socket.socket:
    addr = rc.Address.parse(address)
    s = socket.create_connection((addr.hosts[0], addr.port), timeout=10)
    if tls:
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols([rc.ALPN])
        s = ctx.wrap_socket(s, server_hostname="relay")
        rc.verify_chain(rc.peer_chain(s), addr.fingerprint)
    return s


def _read_all(s: socket.socket) -> bytes:
    """Everything until the relay closes (fails on timeout: the relay must close by itself)."""
    data = b""
    while True:
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    s.close()
    return data


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("--plain", action="store_true", help="the relay serves plain TCP (--plain-tcp)")
    p.add_argument("--transcript", help="write the annotated hex transcript of one exchange of each command here")
    p.add_argument("-v", action="store_true")
    a = p.parse_args()
    run(a.address, a.plain)
    if a.transcript:
        check("transcript of every command written", lambda: transcript_run(a.address, a.plain, a.transcript))
    print(f"{check.passed} passed, {check.failed} failed", flush=True)
    return 0 if check.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
