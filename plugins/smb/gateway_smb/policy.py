"""The app's SMB policy on top of the codec: require_signing and require_encryption, without I/O.

:class:`SmbPolicy` is fed like :class:`gateway_smb.codec.SmbInspector` (it wraps one) and turns
its verdicts into refusals where the negotiated flags fall short of what the app requires:

- ``require_signing``: when the server accepts the session (SESSION_SETUP success), signing must
  be required by the client or the server (the SecurityMode of the NEGOTIATE messages and of
  the SESSION_SETUP request), or the session must be encrypted. A guest or anonymous session
  cannot be signed and is refused. The refused response is not forwarded: the client never has
  the session.
- ``require_encryption``: when the inspection ends, the session or the share must be encrypted
  (SessionFlags or ShareFlags ENCRYPT_DATA) or encrypted messages must have been seen. Else the
  chunk that ended it (the TREE_CONNECT response of an unencrypted share) is not forwarded.

When the inspection ends before the flags could be read (SMB1, allowed but not inspected), a
required property counts as not there: refused.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field

from gateway_smb.codec import Action, SmbInspector, SmbRecord, Verdict


@define
class SmbPolicy:
    inspector: SmbInspector
    require_signing: bool = False
    require_encryption: bool = False
    _session_checked: bool = field(default=False, init=False)

    @property
    def record(self) -> SmbRecord:
        return self.inspector.record

    @property
    def verdict(self) -> Verdict:
        return self.inspector.verdict

    @property
    def buffered(self) -> int:
        return self.inspector.buffered

    def feed_client(self, data: bytes) -> Verdict:
        return self._check(self.inspector.feed_client(data))

    def feed_server(self, data: bytes) -> Verdict:
        return self._check(self.inspector.feed_server(data))

    def _check(self, verdict: Verdict) -> Verdict:
        if verdict.action is Action.REFUSE:
            return verdict
        record = self.record
        problem = None
        if self.require_signing and not self._session_checked and record.session_status == 0:
            self._session_checked = True
            problem = _unsigned(record)
        if problem is None and verdict.action is Action.DONE:
            if self.require_signing and not self._session_checked:
                problem = _unsigned(record)
            if problem is None and self.require_encryption and not record.encrypted:
                problem = ("encryption_required",
                           f"the session is not encrypted (dialect {record.dialect or 'not seen'},"
                           f" share {record.share or 'not seen'} without ENCRYPT_DATA) and the app requires"
                           " encryption (options.require_encryption)")
        if problem is None:
            return verdict
        code, reason = problem
        refusal = Verdict(Action.REFUSE, reason, code)
        self.inspector.verdict = refusal
        return refusal


def _unsigned(record: SmbRecord) -> tuple[str, str] | None:
    """Why the session does not meet require_signing, or None if it does."""
    if record.session_encrypted or record.encrypted_seen:
        return None
    if record.guest or record.anonymous:
        kind = "a guest" if record.guest else "an anonymous"
        return "signing_required", (f"{kind} session cannot be signed and the app requires signing"
                                    " (options.require_signing)")
    if record.signing_required:
        return None
    seen = "not seen" if record.signing_required is None else "required by neither client nor server"
    return "signing_required", (f"signing is {seen} (dialect {record.dialect or 'not seen'}) and the app"
                                " requires signing (options.require_signing)")


def session_facts(policy: Any) -> dict[str, Any]:
    """What the session showed, for stream.session_facts and the connector's session_facts log."""
    record: SmbRecord = policy.record
    return {
        "dialect": record.dialect,
        "signing_required": record.signing_required,
        "signed": record.signed,
        "encrypted": record.encrypted,
        "cipher": record.cipher,
        "mechanism": record.mechanism,
        "user": record.user,
        "domain": record.domain,
        "authenticated": record.authenticated_user is not None,
        "guest": record.guest,
        "share": record.share,
    }
