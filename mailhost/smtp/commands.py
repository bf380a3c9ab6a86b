"""SMTP command handlers (RFC 5321 §4.1.1, RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 2920
PIPELINING, RFC 2034 ENHANCEDSTATUSCODES, RFC 3207 STARTTLS, RFC 4954 AUTH).

A mixin for `SMTPSession` (server.py): these replace `twisted.mail.smtp.ESMTP`'s `do_*`
methods, which ignore ESMTP parameters and lack NOOP/VRFY/HELP (TWISTED-NOTES.md).
"""

from __future__ import annotations

from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from mailhost.accounts import LoginLocked
from mailhost.address import Address, AddressError, parse_address
from mailhost.smtp.auth import (
    MECHANISMS,
    ISMTPSubmitter,
    SASLCancelled,
    SASLError,
    SASLExchange,
    authzid_allowed,
)
from mailhost.smtp.delivery import Envelope, MessageSink, MessageStream, Reply
from mailhost.smtp.received import (
    HeaderScanner,
    new_message_id,
    received_header,
    return_path,
    rfc5322_date,
)

log = Logger(namespace="mailhost.smtp")

SUBMISSION_ROLES = ("submission", "submissions")

HELP_TEXT = ("2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT "
             "STARTTLS AUTH")


class ParamError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def parse_params(opts: bytes | None) -> dict[str, str | None]:
    """ESMTP parameters `KEYWORD[=value] ...` (RFC 5321 §4.1.2), keywords upper-cased."""
    params: dict[str, str | None] = {}
    for item in (opts or b"").split():
        key, eq, value = item.partition(b"=")
        try:
            name = key.decode("ascii").upper()
            text = value.decode("ascii") if eq else None
        except UnicodeDecodeError:
            raise ParamError(Reply(501, "5.5.4", "Error: invalid parameter")) from None
        if not name or not name.replace("-", "").isalnum() or name in params:
            raise ParamError(Reply(501, "5.5.4", "Error: invalid parameter"))
        params[name] = text
    return params


class CommandsMixin:
    """Command handlers; expects the attributes `SMTPSession` sets up."""

    ctx: Any
    role: str
    host: bytes
    mode: str
    limits: Any
    transport: Any

    def reset_session_state(self) -> None:
        """Forget HELO, authentication and the transaction (also after STARTTLS)."""
        self.helo_name: str | None = None
        self.esmtp = False
        self.envelope: Envelope | None = None
        self.stream: MessageStream | None = None
        self.sasl: SASLExchange | None = None
        self.mode = smtp.COMMAND
        logout, self._onLogout = getattr(self, "_onLogout", None), None
        if logout is not None:
            logout()
        self.account: str | None = None
        self.transactions = getattr(self, "transactions", 0)

    def reset_transaction(self) -> None:
        if self.stream is not None:
            self.stream.sink.abort()
        self.envelope = None
        self.stream = None

    # --- dispatch ------------------------------------------------------------------

    def command(self, line: bytes) -> None:
        parts = line.split(None, 1)
        if not parts:
            self.reply(500, "5.5.2", "Error: bad syntax")
            return
        verb = parts[0]
        rest = parts[1].strip() if len(parts) == 2 else b""
        method = None
        if verb.isalpha() and len(verb) <= 16 and verb.upper() != b"UNKNOWN":
            method = self.lookupMethod(verb)
        if method is None:
            self.reply(500, "5.5.2", "Error: command not recognized")
            return
        method(rest)

    @property
    def auth_enabled(self) -> bool:
        return self.role in SUBMISSION_ROLES or self.ctx.config.auth.smtp_auth

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        """The EHLO keywords (RFC 5321 §4.1.1.1)."""
        ext: dict[bytes, list[bytes] | None] = {
            b"SIZE": [str(self.limits.message_size).encode()],
            b"8BITMIME": None,
            b"PIPELINING": None,
            b"ENHANCEDSTATUSCODES": None,
        }
        if self.starttls_available:
            ext[b"STARTTLS"] = None
        if self.auth_enabled and self.tls_active:
            ext[b"AUTH"] = list(MECHANISMS)
        return ext

    # --- session commands ------------------------------------------------------------

    def _greet(self, rest: bytes, esmtp: bool) -> None:
        verb = "EHLO" if esmtp else "HELO"
        if not rest:
            self.reply(501, "5.5.4", f"Syntax: {verb} hostname")
            return
        if any(b < 0x20 or b == 0x7f for b in rest) or len(rest) > 255:
            self.reply(501, "5.5.4", "Error: invalid hostname")
            return
        self.reset_transaction()
        self.helo_name = rest.decode("utf-8", "replace")
        self.esmtp = esmtp
        self._helo = (rest, self.client_ip.encode("ascii", "replace"))
        if esmtp:
            self.sendCode(250, self.host + b"\n" + self.listExtensions())
        else:
            self.sendCode(250, self.host)

    def do_HELO(self, rest: bytes) -> None:
        self._greet(rest, esmtp=False)

    def do_EHLO(self, rest: bytes) -> None:
        self._greet(rest, esmtp=True)

    def do_RSET(self, rest: bytes) -> None:
        if rest:
            self.reply(501, "5.5.4", "Syntax: RSET")
            return
        self.reset_transaction()
        self.reply(250, "2.0.0", "Ok")

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(250, "2.0.0", "Ok")

    def do_VRFY(self, rest: bytes) -> None:
        if not rest:
            self.reply(501, "5.5.4", "Syntax: VRFY address")
            return
        self.reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt "
                                 "delivery")

    def do_EXPN(self, rest: bytes) -> None:
        self.reply(502, "5.5.1", "Error: command not implemented")

    def do_HELP(self, rest: bytes) -> None:
        self.reply(214, *HELP_TEXT.split(" ", 1))

    def do_QUIT(self, rest: bytes) -> None:
        self.reply(221, "2.0.0", "Bye")
        self._close()

    def do_GET(self, rest: bytes) -> None:
        """A web client or proxy talking to the SMTP port (cross-protocol attack): close,
        as Postfix does for its smtpd_forbidden_commands."""
        self.reply(221, "2.7.0", "Error: not an HTTP server, goodbye")
        self._close()

    do_POST = do_CONNECT = do_GET

    def do_UNKNOWN(self, rest: bytes) -> None:
        self.reply(500, "5.5.2", "Error: command not recognized")

    # --- STARTTLS (RFC 3207) -----------------------------------------------------------

    def ext_STARTTLS(self, rest: bytes) -> None:
        if rest:
            self.reply(501, "5.5.4", "Syntax: STARTTLS")
            return
        if self.tls_active:
            self.reply(503, "5.5.1", "Error: TLS already active")
            return
        if not self.starttls_available:
            self.reply(454, "4.7.0", "TLS not available")
            return
        self.reply(220, "2.0.0", "Ready to start TLS")
        # §4.2: discard what the client sent before the handshake, and all knowledge
        # obtained from it (HELO, transaction, authentication): no command injection
        self.discard_pending_input()
        self.reset_transaction()
        self.reset_session_state()
        self.transport.startTLS(self.ctx.tls)
        self.tls_active = True

    # --- AUTH (RFC 4954) -------------------------------------------------------------

    def ext_AUTH(self, rest: bytes) -> None:
        if not self.auth_enabled:
            self.reply(503, "5.5.1", "Error: authentication not enabled")
            return
        if not self.tls_active:
            self.reply(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        if not self.esmtp:
            self.reply(503, "5.5.1", "Error: send EHLO first")
            return
        if self.account is not None:
            self.reply(503, "5.5.1", "Error: already authenticated")
            return
        if self.envelope is not None:
            self.reply(503, "5.5.1", "Error: MAIL transaction in progress")
            return
        parts = rest.split(None, 1)
        if not parts:
            self.reply(501, "5.5.4", "Syntax: AUTH mechanism")
            return
        mechanism = parts[0].upper()
        if mechanism not in MECHANISMS:
            self.reply(504, "5.5.4", "Error: unsupported authentication mechanism")
            return
        self.sasl = SASLExchange(mechanism)
        self._sasl_step(parts[1] if len(parts) == 2 else None)

    def auth_response(self, line: bytes) -> None:
        self._sasl_step(line)

    def _sasl_step(self, response: bytes | None) -> None:
        assert self.sasl is not None
        try:
            result = self.sasl.step(response)
        except SASLCancelled:
            self.mode, self.sasl = smtp.COMMAND, None
            self.reply(501, "5.7.0", "Authentication aborted")
            return
        except SASLError as e:
            self.mode, self.sasl = smtp.COMMAND, None
            self.reply(501, e.status, e.text)
            return
        if isinstance(result, bytes):
            self.mode = smtp.AUTH
            self.sendCode(334, result)
            return
        self.mode, self.sasl = smtp.COMMAND, None
        if not authzid_allowed(result):
            self.reply(535, "5.7.8", "Error: authorization identity not permitted")
            return
        d = self.ctx.authenticator.login(result.authcid, result.password, self.client_ip,
                                         "smtp", ISMTPSubmitter)
        self.await_result(d, self._login_done)

    def _login_done(self, result: Any) -> None:
        if isinstance(result, Failure):
            if result.check(LoginLocked):
                self.reply(454, "4.7.0", "Error: too many failed logins, try again later")
            elif result.check(UnauthorizedLogin):
                self.reply(535, "5.7.8", "Error: authentication failed")
            else:
                log.failure("smtp session {session}: login error", result,
                            session=self.session_id)
                self.reply(454, "4.7.0", "Temporary authentication failure")
            return
        _iface, avatar, logout = result
        self.account = avatar.account
        self._onLogout = logout
        self.reply(235, "2.7.0", "Authentication successful")

    # --- the mail transaction (RFC 5321 §3.3) ------------------------------------------

    def do_MAIL(self, rest: bytes) -> None:
        if self.helo_name is None:
            self.reply(503, "5.5.1", "Error: send HELO/EHLO first")
            return
        if self.envelope is not None:
            self.reply(503, "5.5.1", "Error: nested MAIL command")
            return
        if self.ctx.stopping:
            self._shutdown(Reply(421, "4.3.2", "Service shutting down, try again later"))
            return
        if self.role in SUBMISSION_ROLES:
            if not self.tls_active:
                self.reply(530, "5.7.0", "Must issue a STARTTLS command first")
                return
            if self.account is None:
                self.reply(530, "5.7.0", "Authentication required")
                return
        if not rest.isascii():
            # RFC 6531 §3.2: UTF-8 addresses need SMTPUTF8, which is not offered here
            self.reply(553, "5.6.7", "Error: non-ASCII address without SMTPUTF8")
            return
        m = self.mail_re.match(rest)
        if m is None:
            self.reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
            return
        try:
            params = parse_params(m.group("opts"))
            body, size = self._mail_params(params)
        except ParamError as e:
            self.send_reply(e.reply)
            return
        path = m.group("path")
        sender: Address | None = None
        if path != b"<>":
            try:
                sender = parse_address(path.decode("utf-8"))
            except (AddressError, UnicodeDecodeError):
                self.reply(501, "5.1.7", "Error: bad sender address syntax")
                return
        if self.account is not None and not self.ctx.policy.may_send_as(self.account, sender):
            # RFC 6409 §6.1: the envelope sender must belong to the authenticated user
            self.reply(553, "5.7.1", f"Sender address rejected: not owned by user "
                                     f"{self.account}")
            return
        self.envelope = Envelope(sender, body=body)
        self.reply(250, "2.1.0", "Ok")

    def _mail_params(self, params: dict[str, str | None]) -> tuple[str | None, int | None]:
        body = size = None
        for name, value in params.items():
            if name == "SIZE":  # RFC 1870 §6
                if value is None or not value.isdigit() or len(value) > 20:
                    raise ParamError(Reply(501, "5.5.4", "Error: bad SIZE parameter"))
                size = int(value)
                if size > self.limits.message_size:
                    raise ParamError(Reply(552, "5.3.4", "Message size exceeds fixed "
                                                          "maximum message size"))
            elif name == "BODY":  # RFC 6152 §3
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise ParamError(Reply(501, "5.5.4", "Error: bad BODY parameter"))
                body = value.upper()
            elif name == "AUTH" and self.auth_enabled:  # RFC 4954 §5: accepted, unused
                continue
            else:
                raise ParamError(Reply(555, "5.5.4", f"Unsupported option: {name}"))
        return body, size

    def do_RCPT(self, rest: bytes) -> None:
        env = self.envelope
        if env is None:
            self.reply(503, "5.5.1", "Error: need MAIL command")
            return
        if not rest.isascii():
            self.reply(553, "5.6.7", "Error: non-ASCII address without SMTPUTF8")
            return
        m = self.rcpt_re.match(rest)
        if m is None:
            self.reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return
        if m.group("opts") and m.group("opts").strip():
            self.reply(555, "5.5.4", "Unsupported option")
            return
        if len(env.recipients) >= self.limits.recipients:
            self.reply(452, "4.5.3", "Error: too many recipients")  # RFC 5321 §4.5.3.1.10
            return
        path = m.group("path")
        if path.startswith(b"<") and path.endswith(b">"):
            path = path[1:-1]
        try:
            text = path.decode("utf-8")
            if text.lower() == "postmaster":  # RFC 5321 §4.5.1
                recipient = Address("postmaster", next(iter(self.ctx.config.domains)))
            else:
                recipient = parse_address(text)
        except (AddressError, UnicodeDecodeError):
            self.reply(501, "5.1.3", "Error: bad recipient address syntax")
            return
        d = defer.maybeDeferred(self.ctx.policy.decide_recipient, recipient, self.account,
                                queue_available=self.ctx.queue is not None)
        self.await_result(d, lambda decision: self._rcpt_decided(env, recipient, decision))

    def _rcpt_decided(self, env: Envelope, recipient: Address, decision: Any) -> None:
        if isinstance(decision, Failure):
            log.failure("smtp session {session}: recipient policy failed", decision,
                        session=self.session_id)
            self.reply(451, "4.3.0", "Error: temporary failure, try again later")
            return
        if not decision.accepted:
            self.reply(decision.code, decision.status,
                       f"<{recipient}>: Recipient address rejected: {decision.text}")
            return
        env.recipients.append(str(recipient))
        env.mailboxes.update(dict.fromkeys(decision.mailboxes))
        env.forward.update(dict.fromkeys(decision.forward))
        self.reply(250, decision.status or "2.1.5", "Ok")

    def do_DATA(self, rest: bytes) -> None:
        env = self.envelope
        if env is None:
            self.reply(503, "5.5.1", "Error: need MAIL command")
            return
        if not env.recipients:
            self.reply(554, "5.5.1", "Error: no valid recipients")  # RFC 2920 §3.1
            return
        if rest:
            self.reply(501, "5.5.4", "Syntax: DATA")
            return
        if self.ctx.stopping:
            self._shutdown(Reply(421, "4.3.2", "Service shutting down, try again later"))
            return
        self.transactions += 1
        txid = f"{self.session_id}{self.transactions:02X}"
        self.transaction_id = txid
        received = received_header(
            helo=self.helo_name, client_ip=self.client_ip,
            hostname=self.ctx.config.hostname, protocol=self._with_keyword(),
            transaction_id=txid, recipients=env.recipients,
            seconds=self.ctx.clock.seconds(), tls=self.tls_info if self.tls_active else None,
            hide_ip=self.account is not None and self.ctx.config.submission.hide_client_ip)
        sink = MessageSink(self.ctx, env)
        extra = self._submission_headers if self.account is not None else None
        self.stream = MessageStream(sink, self.limits.message_size, extra)
        sink.open(return_path(env.sender_text) + b"\n" + received + b"\n",
                  received + b"\n")
        self.mode = smtp.DATA
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _with_keyword(self) -> str:
        """RFC 3848 protocol types for the Received `with` clause."""
        if not self.esmtp and not self.tls_active and self.account is None:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls_active else "") + \
            ("A" if self.account is not None else "")

    def _submission_headers(self, scanner: HeaderScanner) -> list[bytes]:
        """RFC 6409 §8.2, §8.3: add Date and Message-ID when the client did not."""
        out = []
        if not scanner.has_date:
            out.append(b"Date: " + rfc5322_date(self.ctx.clock.seconds(), local=True)
                       .encode("ascii"))
        if not scanner.has_message_id:
            mid = new_message_id(self.transaction_id, self.ctx.config.hostname)
            scanner.message_id = mid
            out.append(b"Message-ID: " + mid.encode("ascii"))
        return out

    def end_of_data(self) -> None:
        """The final dot: commit every copy, then 250 (or 4xx/5xx, nothing delivered)."""
        stream, env = self.stream, self.envelope
        self.stream = self.envelope = None
        assert stream is not None and env is not None
        stream.finish()
        if stream.failure is not None:
            stream.sink.abort()
            self.send_reply(stream.failure)
            return
        txid = self.transaction_id
        d = stream.sink.commit()  # in ctx.inflight since DATA (MessageSink)
        self.await_result(d, lambda result: self._committed(env, stream, txid, result))

    def _committed(self, env: Envelope, stream: MessageStream, txid: str,
                   result: Any) -> None:
        if isinstance(result, Failure):
            log.failure("smtp session {session}: storing message {txid} failed", result,
                        session=self.session_id, txid=txid)
            self.reply(451, "4.3.0", "Error: cannot store the message, try again later")
            return
        stored, queue_id = result
        self.message_count += 1
        self.command_count = 0
        log.info("smtp message accepted session={session} client_ip={client_ip} "
                 "helo={helo} tls={tls} from={sender} to={recipients} size={size} "
                 "message_id={message_id} id={txid}", event="smtp.accepted",
                 session=self.session_id,
                 client_ip=self.client_ip, helo=self.helo_name,
                 tls="/".join(self.tls_info) if self.tls_info else None,
                 sender=env.sender_text, recipients=list(env.recipients),
                 size=stream.written, message_id=stream.scanner.message_id, txid=txid,
                 account=self.account, files=[str(p) for p in stored], queue_id=queue_id)
        self.reply(250, "2.0.0", f"Ok: queued as {txid}")
