from datetime import UTC, datetime, timedelta

import pytest

from statemachines.session import (
    LEGAL,
    TRANSITIONS,
    IllegalTransition,
    SessionMachine,
    SessionModel,
    State,
    Trigger,
    edges,
)

AT = datetime(2026, 11, 21, 14, 3, tzinfo=UTC)
ALL_PAIRS = [(state, trigger) for state in State for trigger in Trigger]
LEGAL_PAIRS = [(s, t) for s, t in ALL_PAIRS if (s.name, t.value) in LEGAL]
ILLEGAL_PAIRS = [(s, t) for s, t in ALL_PAIRS if (s.name, t.value) not in LEGAL]


@pytest.fixture(scope="module")
def machine() -> SessionMachine:
    return SessionMachine()


def test_state_names_are_the_public_ones() -> None:
    assert [s.name for s in State] == [
        "DISCONNECTED", "CONNECTING", "AUTHENTICATED", "STREAMING",
        "STALE", "BACKOFF", "CIRCUIT_OPEN", "PAUSED",
    ]  # fmt: skip


def test_every_state_is_reachable_and_left() -> None:
    reached = {dest for _, _, dest in edges()} | {State.DISCONNECTED}
    left = {source for source, _, _ in edges()}
    assert reached == set(State)
    assert left == set(State)


def test_table_has_one_dest_per_state_and_trigger() -> None:
    assert len(LEGAL) == sum(len(e.sources) for e in TRANSITIONS)


@pytest.mark.parametrize(("state", "trigger"), LEGAL_PAIRS, ids=lambda v: getattr(v, "name", v))
def test_every_legal_edge(machine: SessionMachine, state: State, trigger: Trigger) -> None:
    model = machine.register(SessionModel("venue-a", state=state, version=7))
    try:
        record = machine.fire(model, trigger, at=AT, reason="because", detail={"attempt": 2})
    finally:
        machine.unregister(model)
    dest = LEGAL[(state.name, trigger.value)]
    assert model.state.name == dest
    assert model.version == 8
    assert model.since == AT
    assert (record.session, record.version, record.at) == ("venue-a", 8, AT)
    assert (record.source, record.trigger, record.dest) == (state.name, trigger.value, dest)
    assert record.reason == "because"
    assert record.detail == {"attempt": 2}


@pytest.mark.parametrize(("state", "trigger"), ILLEGAL_PAIRS, ids=lambda v: getattr(v, "name", v))
def test_every_illegal_pair_raises_and_changes_nothing(
    machine: SessionMachine, state: State, trigger: Trigger
) -> None:
    model = machine.register(SessionModel("venue-a", state=state, version=3, since=AT))
    try:
        with pytest.raises(IllegalTransition) as info:
            machine.fire(model, trigger, at=AT + timedelta(seconds=1), reason="nope")
    finally:
        machine.unregister(model)
    assert (model.state, model.version, model.since) == (state, 3, AT)
    assert state.name in str(info.value)
    assert trigger.value in str(info.value)


def test_unknown_trigger_is_illegal(machine: SessionMachine) -> None:
    model = machine.register(SessionModel("x"))
    with pytest.raises(IllegalTransition):
        machine.fire(model, "explode", at=AT, reason="?")
    assert model.state is State.DISCONNECTED


def test_may_agrees_with_the_table(machine: SessionMachine) -> None:
    model = SessionModel("x")
    for state, trigger in ALL_PAIRS:
        model.state = state
        assert machine.may(model, trigger) == ((state.name, trigger.value) in LEGAL)


def test_happy_path_then_stale_and_back(machine: SessionMachine) -> None:
    model = machine.register(SessionModel("venue-a"))
    path = ["start", "connected", "authenticated", "data", "stale", "data"]
    records = [machine.fire(model, t, at=AT, reason=t) for t in path]
    assert [r.dest for r in records] == [
        "CONNECTING", "CONNECTING", "AUTHENTICATED", "STREAMING", "STALE", "STREAMING",
    ]  # fmt: skip
    assert [r.version for r in records] == [1, 2, 3, 4, 5, 6]


def test_models_are_independent_and_registered_by_identity(machine: SessionMachine) -> None:
    a = machine.register(SessionModel("same"))
    b = machine.register(SessionModel("same"))
    machine.fire(a, "start", at=AT, reason="go")
    assert (a.state, b.state) == (State.CONNECTING, State.DISCONNECTED)
    machine.unregister(a)
    machine.unregister(b)


def test_registration_is_linear_and_models_are_small() -> None:
    # The library's add_model scans its model list on every call (quadratic); the shared
    # machine's list is identity-indexed, and binds no per-model methods.
    import tracemalloc

    machine = SessionMachine()
    tracemalloc.start()
    models = [machine.register(SessionModel(f"s{i}")) for i in range(20_000)]
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(machine) == 20_000
    assert size / len(models) < 1_000
    assert not hasattr(models[0], "start")


def test_unregistering_keeps_the_others_registered() -> None:
    # Removal moves the last model into the gap: every index must stay right.
    machine = SessionMachine()
    models = [machine.register(SessionModel(f"s{i}")) for i in range(6)]
    for gone in (models[1], models[5], models[0]):
        machine.unregister(gone)
    left = [models[2], models[3], models[4]]
    assert len(machine) == 3
    for model in left:
        machine.fire(model, "start", at=AT, reason="go")  # still the machine's model
        assert model.state is State.CONNECTING
    with pytest.raises(ValueError, match="not registered"):
        machine.unregister(models[1])  # twice: an error, as with the library's list
    for model in left:
        machine.unregister(model)
    assert len(machine) == 0


def test_self_loops_do_not_move_since(machine: SessionMachine) -> None:
    """``since`` is when the state was entered: connected, stable, throttled in
    CIRCUIT_OPEN and the other self-loops leave it alone; remove always begins a stay."""
    model = machine.register(SessionModel("venue-a"))
    later = AT + timedelta(hours=1)
    machine.fire(model, "start", at=AT, reason="go")
    machine.fire(model, "connected", at=later, reason="up")
    assert (model.state, model.since) == (State.CONNECTING, AT)
    for trigger in ("authenticated", "data"):
        machine.fire(model, trigger, at=later, reason=trigger)
    machine.fire(model, "stable", at=later + timedelta(minutes=30), reason="stable")
    assert (model.state, model.since) == (State.STREAMING, later)
    machine.fire(model, "remove", at=later, reason="gone")
    machine.fire(model, "remove", at=later + timedelta(seconds=1), reason="gone again")
    assert model.since == later + timedelta(seconds=1)
    machine.unregister(model)


@pytest.mark.parametrize(("state", "trigger"), LEGAL_PAIRS, ids=lambda v: getattr(v, "name", v))
def test_revert_undoes_a_transition_that_never_became_durable(
    machine: SessionMachine, state: State, trigger: Trigger
) -> None:
    model = machine.register(SessionModel("venue-a", state=state, version=3, since=AT))
    record = machine.fire(model, trigger, at=AT + timedelta(seconds=5), reason="x")
    machine.revert(model, record, AT)
    assert (model.state, model.version, model.since) == (state, 3, AT)
    machine.fire(model, trigger, at=AT, reason="again")  # still the machine's model
    machine.unregister(model)
