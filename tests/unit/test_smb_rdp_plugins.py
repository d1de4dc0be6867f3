"""The smb and rdp plugins' policies and options, without I/O: the SMB policy on real captures
(smbclient against smbd 4.17) and the options' checks at config load and on the connector."""

import pytest
from captures import feed, load_captures

from gateway.config import AppConfig
from gateway.errors import GatewayError
from gateway_rdp import RDPHandler
from gateway_rdp import gateway_service_listeners as rdp_listeners
from gateway_smb import SMBHandler
from gateway_smb import gateway_service_listeners as smb_listeners
from gateway_smb.codec import Action

SMB = load_captures("smb_captures.txt")


def app(protocol, **options):
    return AppConfig(name="files", listen="tcp:1", destination="127.0.0.1:445", host="127.0.0.1", port=445,
                     protocol=protocol, options=options)


def policy_verdict(capture, **options):
    policy = SMBHandler().inspector(app("smb", **options))
    return feed(policy, SMB[capture]), policy


@pytest.mark.parametrize("capture, options", [
    ("smb3_ntlm", {}),
    ("smb3_signed", {"require_signing": True}),
    ("smb3_encrypted", {"require_signing": True, "require_encryption": True}),
    ("smb1_nt1", {"allow_smb1": True}),
])
def test_sessions_that_meet_the_policy_are_done(capture, options):
    """A session whose negotiated flags meet the app's policy is spliced (verdict done)."""
    verdict, _ = policy_verdict(capture, **options)
    assert verdict.action is Action.DONE, verdict


@pytest.mark.parametrize("capture, options, code, words", [
    ("smb3_ntlm", {"require_signing": True}, "signing_required", "required by neither client nor server"),
    ("smb3_guest", {"require_signing": True}, "signing_required", "a guest session cannot be signed"),
    ("smb3_ntlm", {"require_encryption": True}, "encryption_required", "options.require_encryption"),
    ("smb3_signed", {"require_encryption": True}, "encryption_required", "not encrypted"),
    ("smb1_nt1", {"allow_smb1": True, "require_signing": True}, "signing_required", "signing is not seen"),
    ("smb1_multiprotocol", {}, "smb1", "multi-protocol NEGOTIATE"),
])
def test_sessions_that_fall_short_are_refused_with_the_reason(capture, options, code, words):
    """A session whose negotiated flags fall short of the policy is refused, the reason naming why."""
    verdict, policy = policy_verdict(capture, **options)
    assert verdict.action is Action.REFUSE and verdict.code == code and words in verdict.reason, verdict
    assert policy.verdict == verdict


@pytest.mark.parametrize("handler, protocol, key", [
    (SMBHandler(), "smb", "allow_smb1"),
    (SMBHandler(), "smb", "require_signing"),
    (SMBHandler(), "smb", "require_encryption"),
    (RDPHandler(), "rdp", "require_nla"),
])
def test_a_non_boolean_option_is_an_error_naming_the_key(handler, protocol, key):
    """A flag option that is not true/false is reported on the connector and stops the service."""
    bad = app(protocol, **{key: "yes"})
    problem = handler.check_connector_app(bad)
    assert f"options.{key}: expected true or false, got 'yes'" in problem
    listeners = smb_listeners if protocol == "smb" else rdp_listeners

    class Config:
        apps = (app("tcp", **{key: "yes"}), bad)

    with pytest.raises(GatewayError, match=f"app files: options.{key}"):
        listeners(register=None, config=Config, open_stream=None, reactor=None)


def test_idle_timeout_is_checked_for_smb_and_rdp_apps():
    """options.idle_timeout (the tcp plugin's listener serves these apps) is checked at load."""
    for protocol, listeners in (("smb", smb_listeners), ("rdp", rdp_listeners)):
        class Config:
            apps = (app(protocol, idle_timeout=-1),)

        with pytest.raises(GatewayError, match="options.idle_timeout"):
            listeners(register=None, config=Config, open_stream=None, reactor=None)


def test_defaults_are_secure():
    """By default SMB1 is refused and RDP requires NLA; good options give no connector problem."""
    assert SMBHandler().inspector(app("smb")).inspector.allow_smb1 is False
    assert RDPHandler().inspector(app("rdp")).require_nla is True
    assert SMBHandler().check_connector_app(app("smb", require_signing=True)) is None
    assert RDPHandler().check_connector_app(app("rdp", require_nla=False)) is None
