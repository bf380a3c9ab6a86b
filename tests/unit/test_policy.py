"""Recipient decisions: local, alias, +tag, catch-all, loops, relay denied."""

from mailhost.address import Address, parse_address
from mailhost.config import loads
from mailhost.smtp.policy import RecipientPolicy

CONF = """
hostname = "mx.example.org"
data_dir = "/nonexistent"
[domains."example.org"]
aliases = { postmaster = "alice", team = ["alice", "bob", "carol@example.net"], loop1 = "loop2", loop2 = "loop1", deep = "team", selfish = ["selfish", "bob"], other = "dave@other.test" }
[domains."other.test"]
catch_all = "dave"
"""


class Accounts:
    def __init__(self, *names):
        self.names = set(names)

    def exists(self, key):
        return key in self.names


def policy():
    return RecipientPolicy(loads(CONF), Accounts("alice@example.org", "bob@example.org",
                                                 "dave@other.test"))


def decide(addr, auth=None, queue=True):
    return policy().decide_recipient(parse_address(addr), auth, queue_available=queue)


def test_local_account_case_insensitive():
    d = decide("ALICE@Example.Org")
    assert d.accepted and d.mailboxes == ("alice@example.org",) and not d.forward


def test_plus_tag_goes_to_the_user():
    assert decide("bob+news@example.org").mailboxes == ("bob@example.org",)


def test_unknown_user_is_550_511():
    d = decide("nobody@example.org")
    assert (d.accepted, d.code, d.status) == (False, 550, "5.1.1")


def test_relay_denied_for_unauthenticated_client():
    d = decide("someone@elsewhere.test")
    assert (d.accepted, d.code, d.status) == (False, 554, "5.7.1")


def test_relay_allowed_for_authenticated_client_when_queue_exists():
    d = decide("someone@elsewhere.test", auth="alice@example.org")
    assert d.accepted and d.forward == ("someone@elsewhere.test",)
    d = decide("someone@elsewhere.test", auth="alice@example.org", queue=False)
    assert (d.accepted, d.code, d.status) == (False, 451, "4.3.0")


def test_alias_expands_to_local_and_remote():
    d = decide("team@example.org")
    assert d.mailboxes == ("alice@example.org", "bob@example.org")
    assert d.forward == ("carol@example.net",)
    assert decide("team@example.org", queue=False).code == 451


def test_nested_alias_and_cross_domain_catch_all():
    assert decide("deep@example.org").mailboxes == ("alice@example.org", "bob@example.org")
    assert decide("other@example.org").mailboxes == ("dave@other.test",)
    assert decide("whoever@other.test").mailboxes == ("dave@other.test",)


def test_pure_loop_is_rejected_and_partial_loop_delivers_the_rest():
    d = decide("loop1@example.org")
    assert (d.accepted, d.code, d.status) == (False, 550, "5.4.6")
    assert decide("selfish@example.org").mailboxes == ("bob@example.org",)


def test_may_send_as_own_address_tags_and_aliases():
    p = policy()
    assert p.may_send_as("alice@example.org", parse_address("Alice@example.org"))
    assert p.may_send_as("alice@example.org", parse_address("alice+x@example.org"))
    assert p.may_send_as("alice@example.org", parse_address("postmaster@example.org"))
    assert p.may_send_as("alice@example.org", parse_address("team@example.org"))
    assert not p.may_send_as("alice@example.org", parse_address("bob@example.org"))
    assert not p.may_send_as("alice@example.org", parse_address("alice@elsewhere.test"))
    assert not p.may_send_as("alice@example.org", None)


def test_route_local_for_dsns():
    p = policy()
    assert p.route_local("postmaster@example.org") == ["alice@example.org"]
    assert p.route_local("x@elsewhere.test") is None
    assert p.route_local("nobody@example.org") == []
    assert Address("a", "b").key == "a@b"


def test_postmaster_default_for_every_domain():
    conf = CONF.replace('data_dir = "/nonexistent"', 'data_dir = "/nonexistent"\npostmaster = "Alice@example.org"')
    cfg = loads(conf)
    p = RecipientPolicy(cfg, Accounts("alice@example.org", "dave@other.test"))
    # other.test has a catch_all, but postmaster goes to the configured address first
    assert p.decide_recipient(parse_address("postmaster@other.test"), None).mailboxes == \
        ("alice@example.org",)
    # an explicit alias still wins (example.org: postmaster = "alice")
    assert p.decide_recipient(parse_address("postmaster@example.org"), None).mailboxes == \
        ("alice@example.org",)
    assert policy().decide_recipient(parse_address("postmaster@other.test"), None).mailboxes \
        == ("dave@other.test",)  # without the setting: the catch-all


def test_check_config_warns_about_domains_without_postmaster():
    from mailhost.config import warnings

    cfg = loads('hostname = "a.b"\ndata_dir = "/x"\n[domains."a.b"]\n[domains."c.d"]\n'
                'aliases = { postmaster = "x" }\n')
    (warning,) = warnings(cfg)
    assert warning.startswith('domains."a.b": no postmaster')
    assert warnings(loads('hostname = "a.b"\ndata_dir = "/x"\npostmaster = "x@c.d"\n'
                          '[domains."a.b"]\n')) == []
