"""The end-to-end layer of docs/PROTOCOL.md §11 (invitations, key chains, envelopes, receiving),
written from the document alone, for the interoperability checks (conversation.py).

It keeps its state in memory: a real client saves the sending state durably before an envelope
leaves (§11.4), which these short-lived checks do not need. Queue commands go through relay_client.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

import relay_client as rc

INVITE_PREFIX = "relay-invite:"
VERSION = 1
KIND_JOIN, KIND_MESSAGE = 1, 2
SIZES = (256, 1024, 4096, 16384)
TAG = 16
JOIN_HEADER = 1 + 1 + 32 + 8
MESSAGE_HEADER = 1 + 1 + 8
MAX_SKIP = 1000
CONTENT_TEXT = 1
J2I_INFO = b"relay e2e v1 joiner->inviter"
I2J_INFO = b"relay e2e v1 inviter->joiner"
JOIN_SENDER_KEY_LABEL = b"relay/1 join sender key"


class Refused(Exception):
    """An envelope refused by §11.3/§11.4; `reason` is malformed, tampered, replayed or reordered."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---- invitation links (§11.1) ----------------------------------------------------------------------

@dataclass
class Invitation:
    inviter_key: bytes
    sender_id: bytes
    address: str

    def link(self) -> str:
        address = self.address.encode()
        body = bytes([1]) + self.inviter_key + self.sender_id + struct.pack(">H", len(address)) + address
        return INVITE_PREFIX + rc.b64url(body)

    @staticmethod
    def parse(link: str) -> "Invitation":
        link = link.strip()
        if not link.startswith(INVITE_PREFIX):
            raise ValueError("not an invitation link")
        text = link[len(INVITE_PREFIX):]
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        if len(data) < 59 or data[0] != 1:
            raise ValueError("damaged invitation or unknown version")
        (length,) = struct.unpack(">H", data[57:59])
        if length != len(data) - 59:
            raise ValueError("invitation address length does not match")
        return Invitation(data[1:33], data[33:57], data[59:].decode())


# ---- key chains (§11.2) ----------------------------------------------------------------------------

def initial_chains(own_private: bytes, peer_public: bytes, inviter_key: bytes, joiner_key: bytes) -> tuple[bytes, bytes]:
    """(chain(j→i, 0), chain(i→j, 0))."""
    shared = rc.x25519_shared(own_private, peer_public)
    salt = inviter_key + joiner_key
    return rc.hkdf(shared, salt, J2I_INFO), rc.hkdf(shared, salt, I2J_INFO)


def step(chain: bytes) -> tuple[bytes, bytes]:
    """(messageKey(n), chain(n + 1)) from chain(n)."""
    return hmac.new(chain, b"\x01", hashlib.sha256).digest(), hmac.new(chain, b"\x02", hashlib.sha256).digest()


def join_sender_key(inviter_private: bytes, joiner_sender_id: bytes) -> bytes:
    """The reference client's sender key for the joiner's queue (any secret key would do)."""
    return hmac.new(inviter_private, JOIN_SENDER_KEY_LABEL + joiner_sender_id, hashlib.sha256).digest()


# ---- envelopes (§11.3) -----------------------------------------------------------------------------

def padded_size(header_size: int, content_length: int) -> int:
    needed = header_size + 4 + content_length + TAG
    for size in SIZES:
        if needed <= size:
            return size
    raise ValueError("content too long")


def seal(kind: int, counter: int, message_key: bytes, content: bytes, joiner_key: bytes = b"") -> bytes:
    header = bytes([VERSION, kind]) + (joiner_key if kind == KIND_JOIN else b"") + struct.pack(">Q", counter)
    size = padded_size(len(header), len(content))
    plain = struct.pack(">I", len(content)) + content
    plain += bytes(size - len(header) - TAG - len(plain))
    return header + ChaCha20Poly1305(message_key).encrypt(bytes(12), plain, header)


@dataclass
class Header:
    kind: int
    counter: int
    joiner_key: bytes
    size: int  # bytes before `sealed`


def read_header(envelope: bytes) -> Header:
    if len(envelope) not in SIZES:
        raise Refused("malformed", f"length {len(envelope)}")
    if envelope[0] != VERSION:
        raise Refused("malformed", f"version {envelope[0]}")
    if envelope[1] == KIND_JOIN:
        return Header(KIND_JOIN, struct.unpack(">Q", envelope[34:42])[0], envelope[2:34], JOIN_HEADER)
    if envelope[1] == KIND_MESSAGE:
        return Header(KIND_MESSAGE, struct.unpack(">Q", envelope[2:10])[0], b"", MESSAGE_HEADER)
    raise Refused("malformed", f"kind {envelope[1]}")


@dataclass
class ReceiveChain:
    """One direction's receiving state (§11.4): the next expected counter e and chain(e)."""
    chain: bytes
    expected: int = 0

    def open(self, envelope: bytes) -> tuple[Header, bytes, int]:
        """(header, content, missing); raises Refused and leaves the state as it was."""
        header = read_header(envelope)
        n = header.counter
        if n < self.expected:
            raise Refused("replayed", f"counter {n} < {self.expected}")
        if n - self.expected > MAX_SKIP:
            raise Refused("reordered", f"counter {n} too far ahead of {self.expected}")
        chain = self.chain
        for _ in range(self.expected, n + 1):
            message_key, chain = step(chain)
        try:
            plain = ChaCha20Poly1305(message_key).decrypt(bytes(12), envelope[header.size:], envelope[:header.size])
        except InvalidTag as e:
            raise Refused("tampered") from e
        (length,) = struct.unpack(">I", plain[:4])
        if length > len(plain) - 4:
            raise Refused("malformed", "content length beyond the sealed part")
        missing = n - self.expected
        self.chain, self.expected = chain, n + 1
        return header, plain[4:4 + length], missing


@dataclass
class SendChain:
    chain: bytes
    counter: int = 0

    def seal(self, kind: int, content: bytes, joiner_key: bytes = b"") -> bytes:
        message_key, self.chain = step(self.chain)
        envelope = seal(kind, self.counter, message_key, content, joiner_key)
        self.counter += 1
        return envelope


def text_content(text: str) -> bytes:
    return bytes([CONTENT_TEXT]) + text.encode()


def join_content(address: str, sender_id: bytes) -> bytes:
    a = address.encode()
    return struct.pack(">H", len(a)) + a + sender_id


def parse_join_content(content: bytes) -> tuple[str, bytes]:
    if len(content) < 2 + 24:
        raise Refused("malformed", "join content too short")
    (length,) = struct.unpack(">H", content[:2])
    if len(content) != 2 + length + 24:
        raise Refused("malformed", "join content length")
    try:
        address = content[2:2 + length].decode()
        rc.Address.parse(address)
    except ValueError as e:
        raise Refused("malformed", "the JOIN names no valid relay address") from e
    return address, content[2 + length:]


# ---- a conversation over one relay connection ------------------------------------------------------

@dataclass
class Conversation:
    """One side of a conversation. The contact's queue may be on another relay in general; these
    checks keep both queues on the relay of `conn`."""
    conn: rc.Connection
    address: str
    own_private: bytes
    own_public: bytes
    queue: rc.Queue                       # own receiving queue
    inviter: bool
    peer_public: bytes = b""
    send_sender_id: bytes = b""           # the contact's queue
    sender_private: bytes = b""
    send: SendChain | None = None
    receive: ReceiveChain | None = None
    last_accepted: bytes = b""
    received: list = field(default_factory=list)

    # -- inviter --
    @staticmethod
    def invite(conn: rc.Connection, address: str) -> tuple["Conversation", str]:
        own_private, own_public = rc.new_keypair()
        queue = conn.new_queue()
        conv = Conversation(conn, address, own_private, own_public, queue, inviter=True)
        return conv, Invitation(own_public, queue.sender_id, address).link()

    def accept_join(self, envelope: bytes) -> tuple[str, bytes]:
        """Opens the JOIN (counter 0 of j→i), derives the chains; returns (joiner's address, senderId).
        The caller secures the joiner's queue, then calls opened()."""
        if self.receive is not None:
            raise Refused("replayed", "a JOIN once the conversation is open")
        header = read_header(envelope)
        if header.kind != KIND_JOIN:
            raise Refused("malformed", "a MESSAGE before the JOIN")
        j2i, i2j = initial_chains(self.own_private, header.joiner_key, self.own_public, header.joiner_key)
        receive = ReceiveChain(j2i, 0)
        _, content, _ = receive.open(envelope)
        address, sender_id = parse_join_content(content)
        self.peer_public = header.joiner_key
        self.send_sender_id = sender_id
        self.sender_private = join_sender_key(self.own_private, sender_id)
        self._pending = (receive, SendChain(i2j, 0), hashlib.sha256(envelope).digest())
        return address, sender_id

    def opened(self) -> None:
        self.receive, self.send, self.last_accepted = self._pending

    # -- joiner --
    @staticmethod
    def join(conn: rc.Connection, address: str, link: str) -> tuple["Conversation", bytes]:
        """NEW, SKEY on the inviter's queue, JOIN; returns the conversation and the JOIN envelope sent."""
        inv = Invitation.parse(link)
        own_private, own_public = rc.new_keypair()
        j2i, i2j = initial_chains(own_private, inv.inviter_key, inv.inviter_key, own_public)
        queue = conn.new_queue()
        sender_private, _ = rc.new_keypair()
        conn.secure(inv.sender_id, sender_private)
        conv = Conversation(conn, address, own_private, own_public, queue, inviter=False, peer_public=inv.inviter_key,
                            send_sender_id=inv.sender_id, sender_private=sender_private,
                            send=SendChain(j2i, 0), receive=ReceiveChain(i2j, 0))
        envelope = conv.send.seal(KIND_JOIN, join_content(address, queue.sender_id), own_public)
        conn.send(inv.sender_id, envelope, sender_private)
        return conv, envelope

    # -- messages --
    def seal_text(self, text: str) -> bytes:
        return self.send.seal(KIND_MESSAGE, text_content(text))

    def send_text(self, text: str) -> bytes:
        envelope = self.seal_text(text)
        self.conn.send(self.send_sender_id, envelope, self.sender_private)
        return envelope

    def open_message(self, envelope: bytes) -> tuple[Header, bytes, int]:
        """A MESSAGE (or a JOIN, refused as replayed) of the contact's direction."""
        if self.receive is None:
            raise Refused("malformed", "a MESSAGE before the JOIN")
        header = read_header(envelope)
        if header.kind == KIND_JOIN:
            raise Refused("replayed", "a JOIN once the conversation is open")
        result = self.receive.open(envelope)
        self.last_accepted = hashlib.sha256(envelope).digest()
        return result

    def next_delivery(self, tries: int = 50, wait: float = 0.1) -> rc.Delivery:
        """GET until a message is stored, then ACK it (the checks keep what they read)."""
        import time
        for _ in range(tries):
            d = self.conn.get(self.queue)
            if d is not None:
                self.conn.ack(self.queue, d.msg_id)
                return d
            time.sleep(wait)
        raise TimeoutError("no message arrived")
