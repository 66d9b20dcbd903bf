"""A Relay protocol client written from docs/PROTOCOL.md alone (interoperability check).

Needs Python 3.11+ and the `cryptography` package (Debian: python3-cryptography). It does not use
the C# code: every byte is built here from the document, so a disagreement between the document and
the relay shows up as a failing check.

    from relay_client import Connection
    c = Connection.connect("relay://<fingerprint>@127.0.0.1:5223")
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import os
import socket
import ssl
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ALPN = "relay/1"
HANDSHAKE_MAX_FRAME = 1024

# Frame types (PROTOCOL.md §4, §6, §8)
HELLO, WELCOME, PING = 0x01, 0x02, 0x03
NEW, SKEY, SEND, SUB, ACK, GET, OFF, DEL = 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17
ERR, OK, PONG, IDS, MSG, EMPTY, END = 0x80, 0x81, 0x83, 0x90, 0x92, 0x93, 0x94
TYPE_NAMES = {
    HELLO: "HELLO", WELCOME: "WELCOME", PING: "PING", NEW: "NEW", SKEY: "SKEY", SEND: "SEND", SUB: "SUB",
    ACK: "ACK", GET: "GET", OFF: "OFF", DEL: "DEL", ERR: "ERR", OK: "OK", PONG: "PONG", IDS: "IDS", MSG: "MSG",
    EMPTY: "EMPTY", END: "END",
}
# Error codes (PROTOCOL.md §9)
ERROR_NAMES = {
    0x01: "SYNTAX", 0x02: "VERSION", 0x03: "AUTH", 0x04: "NO_QUEUE", 0x05: "QUOTA", 0x06: "TOO_LARGE",
    0x07: "LIMIT", 0x08: "INTERNAL", 0x09: "NO_MSG", 0x0A: "CMD", 0x0B: "FULL", 0x0C: "DISABLED",
}


class RelayError(Exception):
    """The relay answered ERR."""

    def __init__(self, code: int, command: str):
        super().__init__(f"{command}: ERR {ERROR_NAMES.get(code, hex(code))}")
        self.code = code
        self.name = ERROR_NAMES.get(code, hex(code))


class FingerprintMismatch(Exception):
    """The relay's certificate chain does not match the fingerprint in its address (PROTOCOL.md §2)."""


class ConnectionClosed(Exception):
    pass


# ---- keys and derivations (PROTOCOL.md §5, §7) ---------------------------------------------------

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_keypair() -> tuple[bytes, bytes]:
    """(private, public) raw 32-byte X25519 keys."""
    private = x25519.X25519PrivateKey.generate()
    return raw_private(private), raw_public(private.public_key())


def raw_private(key: x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def raw_public(key: x25519.X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_of(private: bytes) -> bytes:
    return raw_public(x25519.X25519PrivateKey.from_private_bytes(private).public_key())


def x25519_shared(private: bytes, peer_public: bytes) -> bytes:
    try:
        shared = x25519.X25519PrivateKey.from_private_bytes(private).exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:  # OpenSSL refuses an all-zero result
        raise ValueError("small-order X25519 key") from e
    if shared == bytes(32):
        raise ValueError("small-order X25519 key")
    return shared


def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def auth_key(client_private: bytes, session_key: bytes, session_id: bytes) -> bytes:
    """authKey = HKDF-SHA256(X25519(clientPrivate, sessionKey), salt = sessionId, info = "relay/1 auth")."""
    return hkdf(x25519_shared(client_private, session_key), session_id, b"relay/1 auth")


def delivery_key(recipient_dh_private: bytes, server_dh_key: bytes, recipient_id: bytes) -> bytes:
    """deliveryKey = HKDF-SHA256(X25519(recipientDhPrivate, serverDhKey), salt = recipientId, info = "relay/1 delivery")."""
    return hkdf(x25519_shared(recipient_dh_private, server_dh_key), recipient_id, b"relay/1 delivery")


def mac16(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:16]


# ---- TLS with fingerprint pinning (PROTOCOL.md §2) ------------------------------------------------

def spki_fingerprint(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b64url(hashlib.sha256(spki).digest())


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or cert.signature_hash_algorithm is None:
        return False
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        return True
    except InvalidSignature:
        return False


def verify_chain(der_chain: list[bytes], fingerprint: str, now: datetime.datetime | None = None) -> None:
    """Raises FingerprintMismatch unless the chain holds a certificate with the pinned SPKI hash and
    the leaf is that certificate or is signed by it, and the leaf is within its validity period."""
    if not der_chain:
        raise FingerprintMismatch("the relay presented no certificate")
    chain = [x509.load_der_x509_certificate(d) for d in der_chain]
    leaf = chain[0]
    now = now or datetime.datetime.utcnow()
    if not (leaf.not_valid_before <= now <= leaf.not_valid_after):
        raise FingerprintMismatch("the relay's TLS certificate is outside its validity period")
    for candidate in chain:
        if not hmac.compare_digest(spki_fingerprint(candidate), fingerprint):
            continue
        if candidate.public_bytes(serialization.Encoding.DER) == der_chain[0] or _signed_by(leaf, candidate):
            return
    raise FingerprintMismatch(f"no certificate in the relay's chain matches fingerprint {fingerprint}")


def peer_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """The chain the server sent, unverified. Public API from Python 3.13; the same C method is
    private (`_sslobj.get_unverified_chain`) in 3.10-3.12."""
    getter = getattr(sock, "get_unverified_chain", None) or getattr(sock._sslobj, "get_unverified_chain")  # noqa: SLF001
    chain = getter() or []
    der = getattr(ssl, "ENCODING_DER", None)
    if der is None:  # before 3.13 the constant lives only in the C module
        import _ssl
        der = _ssl.ENCODING_DER
    return [c if isinstance(c, bytes) else c.public_bytes(der) for c in chain]


@dataclass
class Address:
    fingerprint: str
    hosts: list[str]
    port: int

    @staticmethod
    def parse(text: str) -> "Address":
        if not text.startswith("relay://") or "@" not in text:
            raise ValueError(f"not a relay address: {text}")
        fingerprint, rest = text[len("relay://"):].split("@", 1)
        rest = rest.rstrip("/")
        # §1: the port is optional (5223); an IPv6 literal host is in brackets, so only a colon
        # after the last "]" can start the port.
        port = 5223
        colon = rest.rfind(":")
        if colon > rest.rfind("]"):
            rest, port = rest[:colon], int(rest[colon + 1:])
        hosts = [h[1:-1] if h.startswith("[") and h.endswith("]") else h for h in rest.split(",")]
        return Address(fingerprint, hosts, port)


# ---- frames (PROTOCOL.md §3) -----------------------------------------------------------------------

@dataclass
class Frame:
    type: int
    corr: int
    payload: bytes
    wire: bytes

    @property
    def name(self) -> str:
        return TYPE_NAMES.get(self.type, hex(self.type))


def encode_frame(ftype: int, corr: int, payload: bytes) -> bytes:
    return struct.pack(">IBI", 5 + len(payload), ftype, corr) + payload


@dataclass
class Queue:
    """What a recipient keeps about a queue (and, for the tests, the sender id)."""
    recipient_id: bytes
    sender_id: bytes
    recipient_private: bytes
    recipient_dh_private: bytes
    server_dh_key: bytes
    delivery_key: bytes


@dataclass
class Delivery:
    recipient_id: bytes
    msg_id: int
    nonce: bytes
    hour: int
    flags: int
    body: bytes


class Connection:
    """One connection: frames, handshake, pipelining by correlation id, commands."""

    def __init__(self, sock: socket.socket, log=None):
        self.sock = sock
        self.log = log  # callable(direction, Frame, note) or None
        self.buffer = b""
        self.next_corr = 0
        self.pushes: list[Frame] = []
        self.max_frame = HANDSHAKE_MAX_FRAME
        self.session_id = b""
        self.session_key = b""
        self.version = 0
        self.max_message = 0
        self._auth_keys: dict[bytes, bytes] = {}

    # -- connect --
    @staticmethod
    def connect(address: str, tls: bool = True, host: str | None = None, log=None, timeout: float = 10.0) -> "Connection":
        addr = Address.parse(address)
        raw = socket.create_connection((host or addr.hosts[0], addr.port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock: socket.socket = raw
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.check_hostname = False         # no CA, no host name: the fingerprint pins the relay
            ctx.verify_mode = ssl.CERT_NONE    # verified below, before a single protocol byte is sent
            ctx.set_alpn_protocols([ALPN])
            sock = ctx.wrap_socket(raw, server_hostname="relay")
            try:
                verify_chain(peer_chain(sock), addr.fingerprint)
                if sock.selected_alpn_protocol() != ALPN:
                    raise ConnectionClosed("the relay did not agree to ALPN relay/1")
            except Exception:
                sock.close()
                raise
        conn = Connection(sock, log)
        conn.handshake()
        return conn

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- frame I/O --
    def send_raw(self, data: bytes, note: str = "") -> None:
        if self.log:
            self.log("C->S", Frame(data[4], struct.unpack(">I", data[5:9])[0], data[9:], data), note)
        self.sock.sendall(data)

    def send_frame(self, ftype: int, corr: int, payload: bytes, note: str = "") -> None:
        self.send_raw(encode_frame(ftype, corr, payload), note)

    def read_frame(self) -> Frame:
        while True:
            if len(self.buffer) >= 4:
                (length,) = struct.unpack(">I", self.buffer[:4])
                if length < 5 or length > max(self.max_frame, HANDSHAKE_MAX_FRAME):
                    raise ConnectionClosed(f"the relay sent a frame length of {length}")
                if len(self.buffer) >= 4 + length:
                    wire, self.buffer = self.buffer[:4 + length], self.buffer[4 + length:]
                    ftype, corr = struct.unpack(">BI", wire[4:9])
                    frame = Frame(ftype, corr, wire[9:], wire)
                    if self.log:
                        self.log("S->C", frame, "")
                    return frame
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionClosed("the relay closed the connection")
            self.buffer += chunk

    def corr(self) -> int:
        self.next_corr = (self.next_corr + 1) & 0xFFFFFFFF or 1  # never 0: that is for pushes
        return self.next_corr

    def wait_for(self, corr: int) -> Frame:
        """The answer with this correlation id; pushes (corr 0) that arrive first are queued."""
        while True:
            frame = self.read_frame()
            if frame.corr == corr and corr != 0:
                return frame
            if frame.corr == 0:
                self.pushes.append(frame)
            # answers to other pipelined requests are not expected in this sequential client

    def next_push(self) -> Frame:
        if self.pushes:
            return self.pushes.pop(0)
        while True:
            frame = self.read_frame()
            if frame.corr == 0:
                return frame

    def request(self, ftype: int, payload: bytes, note: str = "") -> Frame:
        c = self.corr()
        self.send_frame(ftype, c, payload, note)
        return self.wait_for(c)

    @staticmethod
    def expect(frame: Frame, ftype: int, command: str) -> Frame:
        if frame.type == ERR:
            raise RelayError(frame.payload[0] if frame.payload else 0x01, command)
        if frame.type != ftype:
            raise ConnectionClosed(f"{command}: unexpected answer {frame.name}")
        return frame

    # -- handshake (§4) --
    def handshake(self, min_version: int = 1, max_version: int = 1) -> None:
        self.send_frame(HELLO, 0, struct.pack(">HH", min_version, max_version))
        frame = self.read_frame()
        if frame.type == ERR:
            raise RelayError(frame.payload[0], "HELLO")
        if frame.type != WELCOME or len(frame.payload) != 74:
            raise ConnectionClosed(f"expected WELCOME, got {frame.name}")
        self.version, self.max_frame, self.max_message = struct.unpack(">HII", frame.payload[:10])
        self.session_id = frame.payload[10:42]
        self.session_key = frame.payload[42:74]

    # -- queue commands (§5, §6) --
    def auth_key(self, private: bytes) -> bytes:
        if private not in self._auth_keys:
            self._auth_keys[private] = auth_key(private, self.session_key, self.session_id)
        return self._auth_keys[private]

    def queue_frame(self, ftype: int, corr: int, queue_id: bytes, args: bytes, private: bytes | None) -> bytes:
        """type ‖ corr ‖ queueId ‖ args ‖ mac, with mac = HMAC-SHA256(authKey, type ‖ corr ‖ queueId ‖ args)[0..16]."""
        assert len(queue_id) == 24
        header = struct.pack(">BI", ftype, corr) + queue_id + args
        mac = mac16(self.auth_key(private), header) if private is not None else bytes(16)
        return struct.pack(">I", len(header) + 16) + header + mac

    def queue_request(self, ftype: int, queue_id: bytes, args: bytes, private: bytes | None, note: str = "") -> Frame:
        c = self.corr()
        self.send_raw(self.queue_frame(ftype, c, queue_id, args, private), note)
        return self.wait_for(c)

    def ping(self) -> None:
        self.expect(self.request(PING, b""), PONG, "PING")

    def new_queue(self, password: bytes = b"") -> Queue:
        recipient_private, recipient_public = new_keypair()
        dh_private, dh_public = new_keypair()
        payload = recipient_public + dh_public + bytes([len(password)]) + password
        ids = self.expect(self.request(NEW, payload), IDS, "NEW").payload
        if len(ids) != 80:
            raise ConnectionClosed("malformed IDS")
        recipient_id, sender_id, server_dh = ids[:24], ids[24:48], ids[48:80]
        return Queue(recipient_id, sender_id, recipient_private, dh_private, server_dh,
                     delivery_key(dh_private, server_dh, recipient_id))

    def secure(self, sender_id: bytes, sender_private: bytes) -> None:
        self.expect(self.queue_request(SKEY, sender_id, public_of(sender_private), sender_private), OK, "SKEY")

    def send(self, sender_id: bytes, body: bytes, sender_private: bytes | None = None, flags: int = 0) -> None:
        self.expect(self.queue_request(SEND, sender_id, bytes([flags]) + body, sender_private), OK, "SEND")

    def subscribe(self, q: Queue, window: int = 1) -> None:
        """SUB (§6): no args for one message at a time, u16 window for up to that many outstanding."""
        args = b"" if window == 1 else struct.pack(">H", window)
        self.expect(self.queue_request(SUB, q.recipient_id, args, q.recipient_private), OK, "SUB")

    def ack(self, q: Queue, msg_id: int, through: bool = False) -> None:
        """ACK (§6): msg_id alone, or (through) every message outstanding on this connection up to it."""
        args = struct.pack(">Q", msg_id) + (b"\x01" if through else b"")
        self.expect(self.queue_request(ACK, q.recipient_id, args, q.recipient_private), OK, "ACK")

    def get(self, q: Queue) -> Delivery | None:
        frame = self.queue_request(GET, q.recipient_id, b"", q.recipient_private)
        if frame.type == EMPTY:
            return None
        return open_delivery(q, self.expect(frame, MSG, "GET").payload)

    def suspend(self, q: Queue) -> None:
        self.expect(self.queue_request(OFF, q.recipient_id, b"", q.recipient_private), OK, "OFF")

    def delete(self, q: Queue) -> None:
        self.expect(self.queue_request(DEL, q.recipient_id, b"", q.recipient_private), OK, "DEL")


def open_delivery(q: Queue, payload: bytes) -> Delivery:
    """MSG payload: recipientId[24] ‖ u64 msgId ‖ nonce[12] ‖ ChaCha20-Poly1305(hour ‖ flags ‖ body) ‖ tag (§7)."""
    recipient_id, msg_id, nonce, sealed = payload[:24], struct.unpack(">Q", payload[24:32])[0], payload[32:44], payload[44:]
    if recipient_id != q.recipient_id:
        raise ConnectionClosed("delivery for another queue")
    try:
        plain = ChaCha20Poly1305(q.delivery_key).decrypt(nonce, sealed, payload[:32])
    except InvalidTag as e:
        raise ConnectionClosed("delivery failed authentication") from e
    hour, flags = struct.unpack(">IB", plain[:5])
    return Delivery(recipient_id, msg_id, nonce, hour, flags, plain[5:])


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
