"""Conversations between the Python end-to-end layer (e2e_layer.py, docs/PROTOCOL.md §11) and the
C# SDK through the `relay` command line, over a running relay. One "PASS name" or "FAIL name: why"
line per check; a step whose precondition failed is reported as failed, so the count stays fixed.

    /usr/bin/python3 conversation.py ADDRESS --relay-bin PATH --dir DIR [--plain]
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys

import e2e_layer as e2e
import relay_client as rc
from checks import Checks

check = Checks()


def refused(reason: str, fn) -> bool:
    try:
        fn()
    except e2e.Refused as e:
        assert e.reason == reason, f"refused as {e.reason}, expected {reason}"
        return True
    raise AssertionError(f"accepted; expected a refusal as {reason}")


def tampered(envelope: bytes, at: int) -> bytes:
    b = bytearray(envelope)
    b[at] ^= 0x01
    return bytes(b)


def expect_size(envelope: bytes, header: int, content_length: int) -> bool:
    assert len(envelope) in e2e.SIZES, f"{len(envelope)} bytes is not a padded size"
    smallest = e2e.padded_size(header, content_length)
    assert len(envelope) == smallest, f"{len(envelope)} bytes, the smallest that fits is {smallest}"
    return True


class Cli:
    def __init__(self, binary: str, plain: bool):
        self.binary = binary
        self.plain = ["--plain-tcp"] if plain else []

    def run(self, *args: str, timeout: float = 60) -> str:
        p = subprocess.run([self.binary, *args, *self.plain], capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(f"relay {args[0]} exited {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    def listen_once(self, profile: str) -> list[str]:
        return self.run("listen", "--profile", profile, "--once", "--timeout", "30").splitlines()


# A 256-byte MESSAGE holds at most 226 bytes of content (10 + 4 + 226 + 16): the type byte and 225
# bytes of UTF-8. One byte more needs 1,024.
TEXT_256 = "é" + "x" * 223          # 225 bytes of UTF-8: content 226, a 256-byte envelope
TEXT_1024 = "x" * 226               # content 227: a 1,024-byte envelope
TEXT_UNICODE = "grüße, 你好 ✓ from the other language"


def cli_sends(cli: "Cli", profile: str, state: dict, text: str, counter: int, size: int):
    """A check: `relay send` of text to "py"; Python opens the exact text as MESSAGE `counter` in a `size`-byte envelope."""
    def run():
        conv = state["conv"]
        cli.run("send", "--profile", profile, "--to", "py", text)
        env = conv.next_delivery().body
        header, content, missing = conv.open_message(env)
        assert header.kind == e2e.KIND_MESSAGE and header.counter == counter, f"kind {header.kind}, counter {header.counter}"
        assert missing == 0 and content == e2e.text_content(text), f"content {content[:40]!r}"
        assert len(env) == size, f"{len(env)} bytes, expected {size}"
        expect_size(env, e2e.MESSAGE_HEADER, len(content))
        state["last"] = env
    return run


def python_invites(cli: Cli, address: str, workdir: str) -> None:
    profile = f"{workdir}/cli-joiner"
    conn = rc.Connection.connect(address, tls=False) if cli.plain else rc.Connection.connect(address)
    state: dict = {}

    def invite():
        conv, link = e2e.Conversation.invite(conn, address)
        state["conv"] = conv
        inv = e2e.Invitation.parse(link)
        assert link.startswith("relay-invite:") and inv.address == address and inv.sender_id == conv.queue.sender_id
        state["link"] = link
    check("py invites: link made (NEW, inviter key, senderId, address)", invite)

    check("py invites: 'relay join LINK' accepts the Python link",
          lambda: cli.run("join", state["link"], "--profile", profile, "--name", "py").strip() == "py")

    def receive_join():
        conv = state["conv"]
        d = conv.next_delivery()
        env = d.body
        header = e2e.read_header(env)
        assert header.kind == e2e.KIND_JOIN and header.counter == 0, f"kind {header.kind}, counter {header.counter}"
        state["join"] = env
        joiner_address, sender_id = conv.accept_join(env)
        assert joiner_address == address, f"JOIN names {joiner_address}"
        assert conv._pending[0].expected == 1
        expect_size(env, e2e.JOIN_HEADER, 2 + len(joiner_address.encode()) + 24)
        state["joiner_sender_id"] = sender_id
    check("py invites: JOIN received, counter 0, chains derived, content = address and senderId, smallest size", receive_join)

    def tampered_join():
        for at in (5, 60, len(state["join"]) - 1):  # joiner key (so other chains), sealed, tag
            refused("tampered", lambda: _fresh_inviter_copy(state["conv"]).accept_join(tampered(state["join"], at)))
    check("py invites: a tampered JOIN is refused (joiner key, sealed byte, tag)", tampered_join)

    def secure():
        conv = state["conv"]
        conn.secure(conv.send_sender_id, conv.sender_private)
        conn.secure(conv.send_sender_id, conv.sender_private)  # the same key again: OK (a JOIN processed again)
        conv.opened()
    check("py invites: joiner's queue secured with the derived key (SKEY OK, twice)", secure)

    check("py invites: the JOIN again is refused as replayed",
          lambda: refused("replayed", lambda: state["conv"].accept_join(state["join"])))

    check("py invites: 'relay send' → Python decrypts the exact text (counter 1, 256 bytes)", cli_sends(cli, profile, state, TEXT_UNICODE, 1, 256))
    check("py invites: 226 bytes of content (the most) → 256-byte envelope", cli_sends(cli, profile, state, TEXT_256, 2, 256))
    check("py invites: 227 bytes of content → 1,024-byte envelope", cli_sends(cli, profile, state, TEXT_1024, 3, 1024))

    def tamper_message():
        conv = state["conv"]
        before = (conv.receive.chain, conv.receive.expected)
        env = state["last"]
        # The chain key before the last envelope is gone (forward secrecy): the state that opened
        # it is recomputed from the conversation keys.
        for at in (20, 200, len(env) - 1):  # sealed bytes, tag
            refused("tampered", lambda: _replay_state(conv, 3).open(tampered(env, at)))
        assert _replay_state(conv, 3).open(env)[1] == e2e.text_content(TEXT_1024)
        assert (conv.receive.chain, conv.receive.expected) == before
    check("py invites: a tampered MESSAGE is refused (sealed bytes, tag); the untampered one opens", tamper_message)
    check("py invites: the last MESSAGE again is refused as replayed",
          lambda: refused("replayed", lambda: state["conv"].open_message(state["last"])))

    def py_sends(text: str, size: int):
        def run():
            conv = state["conv"]
            env = conv.send_text(text)
            assert len(env) == size, f"{len(env)} bytes"
            lines = cli.listen_once(profile)
            assert lines == [f"py: {text}"], f"relay listen printed {lines}"
        return run
    check("py invites: Python's MESSAGE → 'relay listen --once' prints the exact text", py_sends(TEXT_UNICODE, 256))
    check("py invites: Python's 1,024-byte MESSAGE → 'relay listen --once' prints it", py_sends(TEXT_1024, 1024))
    conn.close()


def _fresh_inviter_copy(conv: e2e.Conversation) -> e2e.Conversation:
    return e2e.Conversation(conv.conn, conv.address, conv.own_private, conv.own_public, conv.queue, inviter=True)


def _replay_state(conv: e2e.Conversation, counter: int) -> e2e.ReceiveChain:
    """The j→i receiving state expecting `counter`, recomputed from the keys (test only)."""
    j2i, _ = e2e.initial_chains(conv.own_private, conv.peer_public, conv.own_public, conv.peer_public)
    chain = j2i
    for _ in range(counter):
        _, chain = e2e.step(chain)
    return e2e.ReceiveChain(chain, counter)


def cli_invites(cli: Cli, address: str, workdir: str) -> None:
    profile = f"{workdir}/cli-inviter"
    conn = rc.Connection.connect(address, tls=False) if cli.plain else rc.Connection.connect(address)
    state: dict = {}

    def invite():
        link = cli.run("invite", "--profile", profile, "--relay", address, "--name", "py").strip()
        inv = e2e.Invitation.parse(link)
        assert inv.address == address and len(inv.inviter_key) == 32 and len(inv.sender_id) == 24
        state["link"] = link
    check("cli invites: 'relay invite' link parses (version 1, key, senderId, address)", invite)

    def join():
        conv, env = e2e.Conversation.join(conn, address, state["link"])
        state["conv"] = conv
        expect_size(env, e2e.JOIN_HEADER, 2 + len(address.encode()) + 24)
        h = e2e.read_header(env)
        assert h.kind == e2e.KIND_JOIN and h.counter == 0 and h.joiner_key == conv.own_public
    check("cli invites: Python joins (NEW, SKEY on the inviter's queue, JOIN counter 0)", join)

    def joined_and_message():
        conv = state["conv"]
        env = conv.send_text(TEXT_UNICODE)
        assert e2e.read_header(env).counter == 1
        lines = cli.listen_once(profile)
        assert lines == ["* py joined", f"py: {TEXT_UNICODE}"], f"relay listen printed {lines}"
    check("cli invites: 'relay listen --once' reports the join, then Python's MESSAGE (counter 1)", joined_and_message)

    def secured():
        try:
            other, _ = rc.new_keypair()
            conn.secure(state["conv"].queue.sender_id, other)
        except rc.RelayError as e:
            assert e.name == "AUTH", e.name
            return True
        raise AssertionError("Python's queue is not secured")
    check("cli invites: the CLI secured Python's queue (SKEY with another key: AUTH)", secured)

    def derived():
        # The inviter's conversation private key, read from the CLI's profile (not on the wire): the
        # key §11.1 derives from it is the one that secured the queue, as SKEY with it answers OK.
        with open(f"{profile}/profile.json", encoding="utf-8") as f:
            contact = next(c for c in json.load(f)["contacts"] if c["name"] == "py")
        own_private = base64.b64decode(contact["ownPrivate"])
        conv = state["conv"]
        assert rc.public_of(own_private) == e2e.Invitation.parse(state["link"]).inviter_key
        conn.secure(conv.queue.sender_id, e2e.join_sender_key(own_private, conv.queue.sender_id))
    check("cli invites: the CLI's sender key for Python's queue is the §11.1 derivation (SKEY with it: OK)", derived)

    check("cli invites: 'relay send' → Python decrypts the exact text (counter 0)", cli_sends(cli, profile, state, TEXT_UNICODE, 0, 256))
    check("cli invites: 227 bytes of content → 1,024-byte envelope (counter 1)", cli_sends(cli, profile, state, TEXT_1024, 1, 1024))

    def tamper():
        conv = state["conv"]
        before = (conv.receive.chain, conv.receive.expected)
        cli.run("send", "--profile", profile, "--to", "py", "after the tampered copy")
        env = conv.next_delivery().body
        for at in (20, 100, len(env) - 3):  # sealed bytes, tag
            refused("tampered", lambda: conv.open_message(tampered(env, at)))
        assert (conv.receive.chain, conv.receive.expected) == before, "state changed"
        _, content, _ = conv.open_message(env)
        assert content == e2e.text_content("after the tampered copy")
    check("cli invites: a tampered MESSAGE is refused, the state unchanged; the original then opens", tamper)

    def py_sends():
        conv = state["conv"]
        conv.send_text(TEXT_1024)
        lines = cli.listen_once(profile)
        assert lines == [f"py: {TEXT_1024}"], f"relay listen printed {lines}"
    check("cli invites: Python's second MESSAGE → 'relay listen --once' prints the exact text", py_sends)
    conn.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("--relay-bin", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--plain", action="store_true")
    p.add_argument("-v", action="store_true")
    args = p.parse_args()
    cli = Cli(args.relay_bin, args.plain)
    python_invites(cli, args.address, args.dir)
    cli_invites(cli, args.address, args.dir)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
