"""Accounts file, password verification and login throttling."""

import pytest
import pytest_twisted
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor, task

from mailhost.accounts import (
    AccountDirectory,
    LoginThrottle,
    change_accounts,
    hash_password,
    valid_account_address,
)
from mailhost.address import AddressError
from mailhost.config import AuthConfig


def test_passwd_file_is_private_and_reloaded(tmp_path):
    path = tmp_path / "passwd"
    accounts = AccountDirectory(path)
    assert not accounts.exists("a@x.org")
    change_accounts(path, lambda h: h.__setitem__("a@x.org", hash_password("pw")))
    assert path.stat().st_mode & 0o777 == 0o600
    assert accounts.exists("A@X.ORG")
    change_accounts(path, lambda h: h.pop("a@x.org"))
    assert not accounts.exists("a@x.org")
    assert path.read_text() == ""


@pytest_twisted.inlineCallbacks
def test_verify_good_and_bad_password(tmp_path):
    path = tmp_path / "passwd"
    change_accounts(path, lambda h: h.__setitem__("a@x.org", hash_password("pw")))
    accounts = AccountDirectory(path, reactor)
    key = yield accounts.verify("A@x.org", b"pw")
    assert key == "a@x.org"
    for user, pw in (("a@x.org", b"wrong"), ("nobody@x.org", b"pw"), ("not an address", b"pw")):
        with pytest.raises(UnauthorizedLogin):
            yield accounts.verify(user, pw)


def test_throttle_delays_grow_then_lock_out_and_expire():
    clock = task.Clock()
    policy = AuthConfig(free_failures=2, delay=1.0, max_delay=4.0, lockout_failures=5,
                        lockout=60, window=300)
    t = LoginThrottle(clock, policy)
    delays = [t.failure_delay("1.2.3.4", "a@x.org") for _ in range(4)]
    assert delays == [0.0, 0.0, 1.0, 2.0]
    assert not t.locked("1.2.3.4", "a@x.org")
    t.failure_delay("1.2.3.4", "a@x.org")
    assert t.locked("1.2.3.4", None)          # the IP is locked, whatever account
    assert t.locked("9.9.9.9", "a@x.org")     # and so is the account, from anywhere
    assert not t.locked("9.9.9.9", "b@x.org")
    clock.advance(61)
    assert not t.locked("1.2.3.4", "a@x.org")
    clock.advance(300)
    assert t.failure_delay("1.2.3.4", "a@x.org") == 0.0  # forgotten after the window


def test_success_clears_the_account_record():
    clock = task.Clock()
    t = LoginThrottle(clock, AuthConfig(free_failures=0))
    t.failure_delay("ip", "a@x.org")
    t.success("ip", "a@x.org")
    assert t.failure_delay("other", "a@x.org") == 1.0  # only the new IP record counts


def test_new_account_addresses_are_checked():
    domains = {"x.org": object()}
    assert valid_account_address("Bob@X.org", domains).key == "bob@x.org"
    for bad in ("bob@y.org", "bob+tag@x.org", "nope"):
        with pytest.raises(AddressError):
            valid_account_address(bad, domains)


def test_throttle_memory_is_bounded_under_a_flood_of_new_names():
    clock = task.Clock()
    t = LoginThrottle(clock, AuthConfig(window=60))
    t.max_records = 50
    for i in range(500):
        t.failure_delay(f"127.1.{i // 250}.{i % 250}", f"user{i}@x.org")
    assert len(t._ips) <= 50 and len(t._accounts) <= 50
    clock.advance(61)
    t.failure_delay("1.1.1.1", "z@x.org")
    t.prune()
    assert len(t._accounts) == 1


@pytest_twisted.inlineCallbacks
def test_realm_serves_registered_interfaces_only(tmp_path):
    """One realm for every protocol; an interface nobody registered fails the login
    (twisted.cred's contract: the realm raises NotImplementedError, the Portal errbacks)."""
    from twisted.cred.portal import Portal
    from zope.interface import Interface

    from mailhost.accounts import MailRealm, PasswdChecker

    class IKnown(Interface):
        pass

    class IUnknown(Interface):
        pass

    path = tmp_path / "passwd"
    change_accounts(path, lambda h: h.__setitem__("a@x.org", hash_password("pw")))
    realm = MailRealm()
    realm.register(IKnown, lambda key, mind: {"account": key})
    portal = Portal(realm, [PasswdChecker(AccountDirectory(path, reactor))])
    from twisted.cred.credentials import UsernamePassword

    iface, avatar, logout = yield portal.login(UsernamePassword(b"A@x.org", b"pw"), None,
                                               IKnown)
    assert iface is IKnown and avatar == {"account": "a@x.org"}
    with pytest.raises(NotImplementedError):
        yield portal.login(UsernamePassword(b"a@x.org", b"pw"), None, IUnknown)
