"""The status page and its sign-in form, with twisted.web.template (no JavaScript: the page
reloads itself with <meta http-equiv="refresh">)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from twisted.web.template import Element, Tag, XMLString, flattenString, renderer, tags

from gateway.admin.summary import GroupSummary, when

# Plain, high-contrast and large: admins read it on a wall screen, and the tests read a screenshot.
STYLE = """
body { font-family: sans-serif; font-size: 18px; margin: 1.5em; color: #000; background: #fff; }
table { border-collapse: collapse; margin-bottom: 1.2em; }
th, td { border: 1px solid #888; padding: 0.3em 0.7em; text-align: left; }
th { background: #eee; }
.state-active { color: #064; font-weight: bold; }
.state-inactive, .state-draining, .health-bad { color: #a00; font-weight: bold; }
.error { color: #a00; font-weight: bold; }
.nowrap { white-space: nowrap; }
"""

_PAGE = """<html xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1">
<head><meta charset="utf-8" /><t:transparent t:render="refresh" /><title>Gateway status</title>
<style t:render="style" /></head>
<body>
<h1>Gateway status</h1>
<p>Service node <b t:render="node_id" />, <t:transparent t:render="generated" />.</p>
<form method="post" action="/signout"><input type="hidden" name="csrf" t:render="csrf" />
<button type="submit">Sign out</button></form>
<h2>Connectors</h2>
<table id="connectors"><tr><th>Name</th><th>State</th><th>Version</th><th>Group</th><th>Tunnels</th>
<th>Open streams</th><th>Last heartbeat</th><th>Certificate expires</th><th>Id</th></tr>
<t:transparent t:render="connectors" /></table>
<h2>Groups</h2>
<table id="groups"><tr><th>Group</th><th>Health</th><th>Active</th><th>Apps</th><th>Open streams</th>
<th>Spread of streams</th></tr>
<t:transparent t:render="groups" /></table>
<h2>Recent admin events</h2>
<table id="events"><tr><th>Time (UTC)</th><th>Source</th><th>Level</th><th>Event</th></tr>
<t:transparent t:render="events" /></table>
</body></html>"""

_SIGNIN = """<html xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1">
<head><meta charset="utf-8" /><title>Gateway sign-in</title><style t:render="style" /></head>
<body>
<h1>Gateway sign-in</h1>
<p t:render="problem" />
<form method="post" action="/signin">
<input type="hidden" name="csrf" t:render="csrf" />
<p><label for="token">Admin token</label><br />
<input type="password" id="token" name="token" size="60" autocomplete="off" /></p>
<p><button type="submit" id="signin">Sign in</button></p>
</form>
<p>An admin creates a token on the service with <code>gateway admin token create --name NAME</code>.</p>
</body></html>"""


class StatusPage(Element):
    """The page: connectors, groups with their apps and spread, recent admin events."""

    loader = XMLString(_PAGE)

    def __init__(self, node_id: str, groups: list[GroupSummary], events: list[Any], csrf: str, refresh: int,
                 now: datetime) -> None:
        super().__init__()
        self.node_name, self.summaries, self.recent, self.csrf_token = node_id, groups, events, csrf
        self.refresh_seconds, self.now = refresh, now

    @renderer
    def style(self, request: Any, tag: Tag) -> Tag:
        return tag(STYLE)

    @renderer
    def refresh(self, request: Any, tag: Tag) -> Tag:
        return tags.meta(**{"http-equiv": "refresh", "content": str(self.refresh_seconds)})

    @renderer
    def node_id(self, request: Any, tag: Tag) -> Tag:
        return tag(self.node_name)

    @renderer
    def generated(self, request: Any, tag: Tag) -> str:
        return f"as of {when(self.now)} UTC, reloaded every {self.refresh_seconds} s"

    @renderer
    def csrf(self, request: Any, tag: Tag) -> Tag:
        return tag(value=self.csrf_token)

    @renderer
    def connectors(self, request: Any, tag: Tag) -> list[Tag]:
        rows = []
        for group in self.summaries:
            for c in group.connectors:
                rows.append(tags.tr(
                    tags.td(c.name), tags.td(c.state, class_=f"state-{c.state}"), tags.td(c.software_version or "-"),
                    tags.td(c.group), tags.td(str(c.tunnels)), tags.td(str(c.open_streams)),
                    tags.td(when(c.last_seen), class_="nowrap"), tags.td(when(c.cert_not_after, "-"), class_="nowrap"),
                    tags.td(c.connector_id[:12]),
                    id=f"connector-{c.connector_id}"))
        return rows or [tags.tr(tags.td("No connector has enrolled yet.", colspan="9"))]

    @renderer
    def groups(self, request: Any, tag: Tag) -> list[Tag]:
        rows = []
        for group in self.summaries:
            spread = ", ".join(f"{c.name} {group.share(c)}" for c in group.active if group.share(c) != "-")
            rows.append(tags.tr(
                tags.td(group.name), tags.td(group.health, class_="" if group.health != "NO ACTIVE CONNECTOR"
                                             else "health-bad"),
                tags.td(f"{len(group.active)}/{len(group.connectors)}"), tags.td(", ".join(group.apps) or "-"),
                tags.td(str(group.open_streams)), tags.td(spread or "-")))
        return rows

    @renderer
    def events(self, request: Any, tag: Tag) -> list[Tag]:
        # A connector's events name it as the connectors table does, not by its 32-digit id.
        names = {c.connector_id: f"{c.name} ({c.connector_id[:12]})" for g in self.summaries for c in g.connectors}
        rows = [tags.tr(tags.td(when(datetime.fromtimestamp(e.time, UTC)), class_="nowrap"),
                        tags.td(names.get(e.source, e.source), class_="nowrap"), tags.td(e.level), tags.td(e.text))
                for e in self.recent]
        return rows or [tags.tr(tags.td("No admin event yet.", colspan="4"))]


class SignInPage(Element):
    """The sign-in form; `problem` says why the last attempt was refused."""

    loader = XMLString(_SIGNIN)

    def __init__(self, csrf: str, problem: str = "") -> None:
        super().__init__()
        self.csrf_token, self.problem_text = csrf, problem

    @renderer
    def style(self, request: Any, tag: Tag) -> Tag:
        return tag(STYLE)

    @renderer
    def csrf(self, request: Any, tag: Tag) -> Tag:
        return tag(value=self.csrf_token)

    @renderer
    def problem(self, request: Any, tag: Tag) -> Tag | str:
        return tag(self.problem_text, class_="error", id="problem") if self.problem_text else ""


def render_html(element: Element) -> Any:
    """A Deferred firing with the page's bytes, after a doctype."""
    return flattenString(None, element).addCallback(lambda body: b"<!DOCTYPE html>\n" + body)
