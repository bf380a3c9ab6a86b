"""Delivery status notifications: RFC 3464 reports in an RFC 6522 multipart/report.

A report has three parts: a human-readable explanation, the machine-readable
`message/delivery-status` (per-message then per-recipient fields, RFC 3464 §2.2, §2.3),
and the original headers (`text/rfc822-headers`) or, with RET=FULL (RFC 3461 §4.3), the
whole original message. Output uses LF line ends, like everything stored in the spool.
"""

from __future__ import annotations

import secrets
from email.utils import formatdate

from mailhost.queue.spool import Envelope, Recipient

FAILED = "failed"
DELAYED = "delayed"

#: the largest original message returned in full; beyond it only headers go back
MAX_RETURNED = 1024 * 1024


def original_headers(message: bytes) -> bytes:
    """The header section of a stored message (up to the first empty line)."""
    end = message.find(b"\n\n")
    head = message if end < 0 else message[:end + 1]
    return head if head.endswith(b"\n") else head + b"\n"


def _address_type(address: str) -> str:
    # RFC 6533 §3: "utf-8" address type for internationalised addresses
    return "rfc822" if address.isascii() else "utf-8"


def _clean(text: str) -> str:
    return " ".join(text.split())


def _recipient_fields(r: Recipient, action: str, will_retry_until: float | None) -> list[str]:
    lines = []
    if r.orcpt:
        lines.append(f"Original-Recipient: {_clean(r.orcpt)}")
    lines.append(f"Final-Recipient: {_address_type(r.address)}; {r.address}")
    lines.append(f"Action: {action}")
    status = r.status_code or ("5.0.0" if action == FAILED else "4.0.0")
    lines.append(f"Status: {status}")
    if r.remote_mta:
        lines.append(f"Remote-MTA: dns; {r.remote_mta}")
    if r.last_reply:
        # RFC 3464 §2.3.6: the reply from the remote MTA, or our own description
        kind = "smtp" if r.remote_mta else "x-mailhost"
        lines.append(f"Diagnostic-Code: {kind}; {_clean(r.last_reply)}")
    if r.last_attempt is not None:
        lines.append(f"Last-Attempt-Date: {formatdate(r.last_attempt, usegmt=True)}")
    if will_retry_until is not None:
        lines.append(f"Will-Retry-Until: {formatdate(will_retry_until, usegmt=True)}")
    return lines


def _human(hostname: str, action: str, recipients: list[Recipient], hours: float) -> str:
    if action == FAILED:
        intro = (f"This is the mail system at host {hostname}.\n\n"
                 "I'm sorry to have to inform you that your message could not\n"
                 "be delivered to one or more recipients. It's attached below.\n")
    else:
        intro = (f"This is the mail system at host {hostname}.\n\n"
                 f"Your message could not be delivered for {hours:.1f} hours.\n"
                 "It will be retried until it is too old; you need not send it again.\n")
    lines = [intro]
    for r in recipients:
        reason = _clean(r.last_reply) or "no reason recorded"
        host = f" (host {r.remote_mta})" if r.remote_mta else ""
        lines.append(f"<{r.address}>{host}: {reason}")
    return "\n".join(lines) + "\n"


def build_report(hostname: str, envelope: Envelope, recipients: list[Recipient],
                 action: str, original: bytes, now: float,
                 will_retry_until: float | None = None) -> bytes:
    """An RFC 3464 report to `envelope.sender` about `recipients` (all one `action`)."""
    boundary = f"{secrets.token_hex(8)}/{hostname}"
    msgid = f"<{secrets.token_hex(10)}@{hostname}>"
    subject = ("Undelivered Mail Returned to Sender" if action == FAILED
               else "Delayed Mail (still being retried)")
    utf8 = (not envelope.sender.isascii() or not original_headers(original).isascii()
            or not all(r.address.isascii() for r in recipients))
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{envelope.sender}>",
        f"Subject: {subject}",
        f"Date: {formatdate(now, usegmt=True)}",
        f"Message-ID: {msgid}",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    per_message = [f"Reporting-MTA: dns; {hostname}"]
    if envelope.envid:
        per_message.append(f"Original-Envelope-Id: {_clean(envelope.envid)}")
    per_message.append(f"Arrival-Date: {formatdate(envelope.created, usegmt=True)}")
    status_blocks = ["\n".join(per_message)]
    for r in recipients:
        status_blocks.append("\n".join(_recipient_fields(r, action, will_retry_until)))
    hours = (now - envelope.created) / 3600.0
    human = _human(hostname, action, recipients, hours)

    full = envelope.ret == "FULL" and len(original) <= MAX_RETURNED and action == FAILED
    if full:
        returned_type = "message/global" if utf8 else "message/rfc822"
        returned = original if original.endswith(b"\n") else original + b"\n"
    else:
        returned_type = "message/global-headers" if utf8 else "text/rfc822-headers"
        returned = original_headers(original)
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"

    parts = [
        "\n".join(headers).encode("utf-8"), b"\n\nThis is a MIME-encapsulated message.\n\n",
        f"--{boundary}\n".encode(),
        b"Content-Description: Notification\n",
        b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n",
        human.encode("utf-8"), b"\n",
        f"--{boundary}\n".encode(),
        b"Content-Description: Delivery report\n",
        f"Content-Type: {status_type}\n\n".encode(),
        ("\n\n".join(status_blocks) + "\n").encode("utf-8"), b"\n",
        f"--{boundary}\n".encode(),
        b"Content-Description: Undelivered message" if full
        else b"Content-Description: Undelivered message headers",
        f"\nContent-Type: {returned_type}\n".encode(),
        b"Content-Transfer-Encoding: 8bit\n\n" if not returned.isascii() else b"\n",
        returned, b"\n",
        f"--{boundary}--\n".encode(),
    ]
    return b"".join(parts)


def wants(recipient: Recipient, event: str) -> bool:
    """Does the recipient's RFC 3461 NOTIFY ask for `event` (FAILURE, DELAY, SUCCESS)?

    Without NOTIFY we report failures and delays (RFC 3461 §4.1 leaves it to us).
    """
    if recipient.notify is None:
        return event in ("FAILURE", "DELAY")
    values = {v.strip().upper() for v in recipient.notify.split(",")}
    return "NEVER" not in values and event in values
