"""Recomputes a transcript written by lifecycle.py --transcript (or docs/PROTOCOL.md Appendix A):
every length prefix, every MAC (from the printed private keys and the WELCOME's session values) and
every MSG decryption (from the printed recipient DH key and the IDS answer). Exit 0 when all agree.

    /usr/bin/python3 verify_transcript.py docs/PROTOCOL.md
"""

from __future__ import annotations

import re
import struct
import sys

import relay_client as rc


def main(path: str) -> int:
    text = open(path, encoding="utf-8").read()
    if "## Appendix A" in text:
        text = text[text.index("## Appendix A"):]
    notes = "\n".join(line[2:] for line in text.splitlines() if line.startswith("# "))
    frames: list[tuple[str, bytes]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(C→S|S→C) ", line)
        if m and i + 1 < len(lines):
            frames.append((m.group(1), bytes.fromhex(lines[i + 1].strip())))

    def key(label: str) -> bytes:
        m = re.search(label + r"\s*private ([0-9a-f]{64})", notes)
        if not m:
            raise SystemExit(f"no '{label} private' in the transcript notes")
        return bytes.fromhex(m.group(1))

    recipient_private, dh_private, sender_private = key("recipient key:"), key("recipient DH key:"), key("sender key:")
    problems, checked = [], 0
    session_id = session_key = delivery = None
    recipient_id = None
    for direction, wire in frames:
        length, ftype, corr = struct.unpack(">IBI", wire[:9])
        payload = wire[9:]
        if length != len(wire) - 4:
            problems.append(f"{direction} type 0x{ftype:02x} corr {corr}: length {length} but {len(wire) - 4} bytes")
        if ftype == rc.WELCOME:
            session_id, session_key = payload[10:42], payload[42:74]
        elif ftype == rc.NEW:
            if payload[:32] != rc.public_of(recipient_private) or payload[32:64] != rc.public_of(dh_private):
                problems.append("NEW keys are not the public keys of the printed private keys")
        elif ftype == rc.IDS:
            recipient_id = payload[:24]
            delivery = rc.delivery_key(dh_private, payload[48:80], recipient_id)
        elif direction == "C→S" and ftype in (rc.SKEY, rc.SEND, rc.SUB, rc.ACK, rc.GET, rc.OFF, rc.DEL):
            private = sender_private if ftype in (rc.SKEY, rc.SEND) else recipient_private
            expected = rc.mac16(rc.auth_key(private, session_key, session_id), wire[4:-16])
            if expected != wire[-16:]:
                problems.append(f"type 0x{ftype:02x} corr {corr}: MAC {wire[-16:].hex()} != recomputed {expected.hex()}")
            checked += 1
        elif ftype == rc.MSG:
            q = rc.Queue(recipient_id, b"", recipient_private, dh_private, b"", delivery)
            try:
                d = rc.open_delivery(q, payload)
                print(f"MSG msgId {d.msg_id}: hour {d.hour}, flags {d.flags}, body {d.body!r}")
                checked += 1
            except rc.ConnectionClosed as e:
                problems.append(f"MSG corr {corr}: {e}")
    for p in problems:
        print("MISMATCH", p)
    print(f"{len(frames)} frames, {checked} MACs and deliveries recomputed, {len(problems)} mismatches")
    return 0 if frames and not problems else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
