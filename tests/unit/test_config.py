"""Config validation: every problem reported at once, with its key path."""

import pytest

from mailhost.config import DEFAULT_TOML, ConfigError, load, loads

GOOD = """
hostname = "mail.example.org"
data_dir = "/var/lib/mailhost"
[listen]
smtp = ["tcp:25"]
imaps = ["tcp:993:interface=127.0.0.1"]
[domains."Example.ORG"]
aliases = { postmaster = "alice", team = ["alice", "bob", "carol@example.net"] }
catch_all = "alice"
[limits]
message_size = 1000
[queue]
dns_servers = ["127.0.0.1:5353"]
smarthost = "relay.example.net:587"
"""


def test_good_config_parses_into_frozen_values():
    cfg = loads(GOOD)
    assert cfg.hostname == "mail.example.org"
    assert cfg.listen.smtp == ("tcp:25",)
    assert cfg.listen.pop3 == ()
    dom = cfg.domains["example.org"]
    assert dom.aliases["team"] == ("alice", "bob", "carol@example.net")
    assert dom.aliases["postmaster"] == ("alice",)
    assert dom.catch_all == "alice"
    assert cfg.limits.message_size == 1000
    assert cfg.limits.recipients == 100
    assert cfg.queue.smarthost == "relay.example.net:587"
    with pytest.raises(AttributeError):
        cfg.hostname = "x"


def test_embedded_default_is_loopback_only():
    cfg = load(None)
    assert cfg.hostname == "localhost"
    assert set(cfg.domains) == {"localhost"}
    for role in ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps"):
        (desc,) = getattr(cfg.listen, role)
        assert "interface=127.0.0.1" in desc
    assert "2525" in cfg.listen.smtp[0] and "2993" in cfg.listen.imaps[0]
    assert cfg.data_dir.name == "mailhost-data"
    assert DEFAULT_TOML.startswith('hostname = "localhost"')


def test_all_errors_reported_at_once_with_key_paths():
    bad = """
hostname = "not a host"
surprise = 1
[listen]
smtp = ["bogus:25"]
pop3 = "tcp:110"
[limits]
message_size = "big"
recipients = -1
nonsense = true
[domains."example.org"]
aliases = { "a b" = "x", ok = 3 }
colour = "blue"
[queue]
smarthost = "nohost"
smarthost_tls = "maybe"
"""
    with pytest.raises(ConfigError) as info:
        loads(bad)
    problems = info.value.problems
    text = "\n".join(problems)
    for fragment in ("hostname:", "data_dir: missing", "surprise: unknown key",
                     "listen.smtp[0]:", "listen.pop3: expected an array of strings",
                     "limits.message_size: expected an integer",
                     "limits.recipients: must be greater than 0",
                     "limits.nonsense: unknown key",
                     'domains."example.org".aliases.a b', 'domains."example.org".aliases.ok',
                     'domains."example.org".colour: unknown key',
                     "queue.smarthost: must be 'host:port'", "queue.smarthost_tls"):
        assert fragment in text, fragment
    assert len(problems) >= 13


def test_toml_syntax_error_is_one_clear_problem():
    with pytest.raises(ConfigError) as info:
        loads("hostname = ", source="x.toml")
    assert info.value.problems[0].startswith("x.toml: TOML syntax error")


def test_no_domain_is_an_error():
    with pytest.raises(ConfigError) as info:
        loads('hostname = "a.b"\ndata_dir = "/x"\n')
    assert any(p.startswith("domains:") for p in info.value.problems)


def test_tls_needs_both_files(tmp_path):
    with pytest.raises(ConfigError) as info:
        loads(f'hostname = "a.b"\ndata_dir = "/x"\n[tls]\ncertificate = "{tmp_path}/c.pem"\n'
              '[domains."a.b"]\n')
    text = "\n".join(info.value.problems)
    assert "certificate and private_key must be given together" in text
    assert "tls.certificate: file not found" in text


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.toml")
    assert "cannot read" in info.value.problems[0]


def test_relative_data_dir_is_relative_to_the_config_file(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('hostname = "a.b"\ndata_dir = "state"\n[domains."a.b"]\n')
    assert load(path).data_dir == tmp_path / "state"


def test_example_config_in_repository_is_valid():
    from pathlib import Path

    cfg = load(Path(__file__).parents[2] / "etc" / "mailhost.toml")
    assert cfg.listen.smtp == ("tcp:25",)
    assert cfg.queue.lifetime == 5 * 86400


def test_endpoint_strings_are_checked_without_binding():
    from mailhost.config import _validate_endpoint as check

    for good in ("tcp:25", "tcp:0:interface=127.0.0.1", "tcp6:587:interface=\\:\\:1",
                 "unix:/run/mailhost/smtp.sock", "systemd:domain=INET:index=0"):
        assert check(good) is None, good
    for bad, why in (("tcp:abc", "invalid literal"), ("tcp:25:bogus=1", "bogus"),
                     ("tcp:99999", "out of range"), ("ssl:465", "unsupported"),
                     ("systemd:domain=X:index=0", "systemd:domain=")):
        assert why in check(bad), bad
