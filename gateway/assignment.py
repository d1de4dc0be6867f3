"""Which signed-in users an app admits: ``options.allowed_users`` and ``options.allowed_groups``.

One rule for web apps (the http plugin's gate) and private apps (the service's access check),
so a user assigned to one kind is assigned the same way to the other.
"""

from __future__ import annotations

from typing import Any, Iterable


def is_assigned(app: Any, subject: str, email: str = "", email_verified: bool = False,
                groups: Iterable[str] = ()) -> bool:
    """Whether the user may use ``app``.

    ``allowed_users`` holds subjects or email addresses, ``allowed_groups`` group names; either
    admits. An email counts only when the provider verified it: many providers let a user type
    any address. An app that sets neither admits every signed-in user (web apps; a private app
    must set one, the config refuses it otherwise).
    """
    users = app.options.get("allowed_users")
    wanted_groups = app.options.get("allowed_groups")
    if users is None and wanted_groups is None:
        return True
    if users:
        wanted = {str(u).strip() for u in users}
        if subject in wanted:
            return True
        if email and email_verified and email.lower() in {u.lower() for u in wanted}:
            return True
    if wanted_groups:
        if set(groups) & {str(g).strip() for g in wanted_groups}:
            return True
    return False
