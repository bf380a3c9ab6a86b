"""Any-state and not-authenticated commands (RFC 3501 §6.1, §6.2), with SASL-IR
(RFC 4959), ID (RFC 2971), NAMESPACE (RFC 2342) and ENABLE (RFC 5161)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

from mailhost import sasl
from mailhost.accounts import LoginLocked
from mailhost.imap.account import IIMAPAccount
from mailhost.imap.wire import ATOM_CHARS, Args, BadCommand, CommandFailed


class Silent(Exception):
    """The handler already sent its tagged reply."""


def _b64(data: bytes) -> bytes:
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadCommand("invalid base64") from e


class SessionCommands:
    """Mixin of `IMAPServer`: capability, login and session-wide commands."""

    # --- any state (RFC 3501 §6.1) --------------------------------------------------------

    def cmd_CAPABILITY(self, tag: bytes, args: Args, uid: bool) -> str:
        args.end()
        self.send(b"* CAPABILITY " + self.capabilities())
        return ""

    def cmd_NOOP(self, tag: bytes, args: Args, uid: bool) -> str:
        args.end()
        return ""

    def cmd_LOGOUT(self, tag: bytes, args: Args, uid: bool) -> None:
        args.end()
        self.send(b"* BYE mailhost logging out")
        self.send(tag + b" OK LOGOUT completed")
        self.deselect()
        self._closed = True
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self.transport.loseConnection()
        raise Silent()

    def cmd_ID(self, tag: bytes, args: Args, uid: bool) -> str:
        """RFC 2971: the client's parameters are read and ignored."""
        args.sp()
        if not args.accept(b"("):
            args.atom()  # NIL
        else:
            while not args.accept(b")"):
                args.accept(b" ")
                args.astring() if args.peek() != ord("N") else args.atom()
        args.end()
        self.send(b'* ID ("name" "mailhost" "vendor" "mailhost")')
        return ""

    # --- not authenticated (RFC 3501 §6.2) ------------------------------------------------

    def cmd_STARTTLS(self, tag: bytes, args: Args, uid: bool) -> str:
        args.end()
        if self.role != "imap" or self.tls:
            raise BadCommand("TLS is already active")
        # CVE-2011-0411 class: nothing pipelined after STARTTLS may run inside TLS
        self._pos = len(self._buf)  # drop everything already received
        self._reset_command()
        self.send(tag + b" OK begin TLS negotiation now")
        self.transport.startTLS(self.ctx.tls)
        self.tls = True
        raise Silent()

    def cmd_LOGIN(self, tag: bytes, args: Args, uid: bool) -> defer.Deferred:
        args.sp()
        user = args.astring()
        args.sp()
        password = args.astring()
        args.end()
        return self._login(user, password)

    def cmd_AUTHENTICATE(self, tag: bytes, args: Args, uid: bool) -> Any:
        """RFC 3501 §6.2.2 with SASL-IR (RFC 4959): PLAIN and LOGIN."""
        args.sp()
        mech = args.atom().upper()
        initial = None
        if args.accept(b" "):
            initial = args.read_chars(ATOM_CHARS | {ord("=")})
        args.end()
        if mech not in ("PLAIN", "LOGIN"):
            raise CommandFailed("unsupported mechanism")
        if not self.login_allowed():
            raise CommandFailed("log in only after STARTTLS", "PRIVACYREQUIRED")
        done: defer.Deferred = defer.Deferred()

        def ask(prompt: bytes, then: Any) -> None:
            self.send(b"+ " + prompt)

            def got(line: bytes) -> None:
                if line.strip() == b"*":
                    done.errback(BadCommand("authentication cancelled"))
                    return
                try:
                    then(_b64(line))
                except (BadCommand, CommandFailed) as e:
                    done.errback(e)

            self._line_handler = got

        def plain(blob: bytes) -> None:
            try:
                creds = sasl.parse_plain(blob)
            except sasl.MalformedPlain:
                raise BadCommand("malformed PLAIN response") from None
            if not sasl.authzid_allowed(creds):
                done.errback(CommandFailed("proxy authentication not allowed",
                                           "AUTHORIZATIONFAILED"))
                return
            self._login(creds.authcid, creds.password).chainDeferred(done)

        def login_user(user: bytes) -> None:
            ask(b"UGFzc3dvcmQ6", lambda pw: self._login(user, pw).chainDeferred(done))

        if mech == "PLAIN":
            if initial is not None:
                plain(_b64(initial) if initial != b"=" else b"")
            else:
                ask(b"", plain)
        elif initial is not None and initial != b"=":
            # RFC 4959 §3: an initial response is the mechanism's first client message;
            # for LOGIN that is the user name (curl --sasl-ir, Dovecot accepts it too)
            login_user(_b64(initial))
        else:
            ask(b"VXNlcm5hbWU6", login_user)
        return done

    def _login(self, user: bytes, password: bytes) -> defer.Deferred:
        if not self.login_allowed():
            return defer.fail(CommandFailed("log in only after STARTTLS", "PRIVACYREQUIRED"))
        d = self.ctx.authenticator.login(user, password, self.ip, "imap", IIMAPAccount)

        def ok(result: Any) -> str:
            _, avatar, logout = result
            if self._closed:
                logout()
                raise Silent()
            if self.factory.sessions[avatar.key] >= self.limits.sessions_per_account:
                logout()
                raise CommandFailed("too many sessions for this account", "LIMIT")
            avatar.ensure_defaults()
            self.factory.sessions[avatar.key] += 1
            self.account, self._logout = avatar, logout
            self.state = "auth"
            self._reset_timeout()
            return "[CAPABILITY " + self.capabilities().decode() + "] logged in"

        def failed(failure: Any) -> None:
            if failure.check(LoginLocked):
                raise CommandFailed("too many failed logins; try again later",
                                    "UNAVAILABLE")
            failure.trap(UnauthorizedLogin)
            raise CommandFailed("invalid user name or password", "AUTHENTICATIONFAILED")

        return d.addCallbacks(ok, failed)

    # --- authenticated, any (RFC 2342, RFC 5161) -------------------------------------------

    def cmd_NAMESPACE(self, tag: bytes, args: Args, uid: bool) -> str:
        args.end()
        self.send(b'* NAMESPACE (("" ".")) NIL NIL')
        return ""

    def cmd_ENABLE(self, tag: bytes, args: Args, uid: bool) -> str:
        """RFC 5161: nothing we offer needs enabling; answer with an empty ENABLED."""
        args.sp()
        args.atom()
        while args.accept(b" "):
            args.atom()
        args.end()
        self.send(b"* ENABLED")
        return ""
