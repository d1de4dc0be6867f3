"""The service node's recent admin events: bounded, newest first, per source."""

from gateway.service.admin_events import AdminEvent, AdminEvents


def event(time: float, source: str = "node", text: str = "x") -> AdminEvent:
    return AdminEvent(time=time, source=source, level="info", text=text)


def test_recent_is_newest_first_across_sources():
    """recent() merges the sources by time, newest first, and stops at limit."""
    events = AdminEvents()
    for t, source in [(1, "node"), (2, "c1"), (3, "node"), (4, "c2"), (5, "c1")]:
        events.add(event(t, source))
    assert [e.time for e in events.recent()] == [5, 4, 3, 2, 1]
    assert [e.time for e in events.recent(limit=2)] == [5, 4]
    assert events.recent(limit=0) == []


def test_recent_of_one_source():
    """recent(source=...) gives that source's events only, newest first; an unknown one none."""
    events = AdminEvents()
    for t, source in [(1, "node"), (2, "c1"), (3, "c1")]:
        events.add(event(t, source))
    assert [e.time for e in events.recent(source="c1")] == [3, 2]
    assert events.recent(source="nobody") == []


def test_each_source_keeps_only_its_newest_events():
    """A chatty source keeps per_source events and does not push another source's out."""
    events = AdminEvents(per_source=3)
    events.add(event(0, "quiet"))
    for t in range(1, 11):
        events.add(event(t, "chatty"))
    assert [e.time for e in events.recent(source="chatty")] == [10, 9, 8]
    assert [e.time for e in events.recent(source="quiet")] == [0]


def test_the_source_heard_from_least_recently_is_forgotten_first():
    """Past max_sources, the source that sent nothing for longest goes."""
    events = AdminEvents(max_sources=2)
    events.add(event(1, "a"))
    events.add(event(2, "b"))
    events.add(event(3, "a"))
    events.add(event(4, "c"))
    assert events.sources() == ["c", "a"]
    assert events.recent(source="b") == []


def test_a_connectors_event_is_bounded_and_names_the_connector():
    """admin_event from a connector: its certificate's id as source, text cut, unknown level info,
    a time ahead of the node's clock brought back to now."""
    from gateway.service.admin_events import MAX_TEXT, event_from_message

    event = event_from_message("c1", {"source": "node", "level": "root", "text": "x" * 10_000, "time": 1e12}, 100.0)
    assert (event.source, event.level, len(event.text), event.time) == ("c1", "info", MAX_TEXT, 100.0)
    assert event_from_message("c1", {"text": ["not text"], "time": "soon"}, 5.0).time == 5.0


def test_all_sources_together_keep_at_most_max_total_events():
    """Many sources within their own bound still keep max_total events in all, the oldest dropped."""
    events = AdminEvents(per_source=10, max_total=25)
    for t in range(60):
        events.add(event(t, f"c{t % 6}"))
    kept = events.recent(limit=1000)
    assert len(kept) == 25 and [e.time for e in kept] == list(range(59, 34, -1))
    events.add(event(60, "c0"))
    assert len(events.recent(limit=1000)) == 25
