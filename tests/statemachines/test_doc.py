from pathlib import Path

from statemachines.doc import BEGIN, END, block, update

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_tables_are_generated_from_the_machine() -> None:
    text = README.read_text()
    assert block() in text, "run `python -m statemachines.doc README.md`"
    assert update(text) == text


def test_every_state_and_trigger_is_in_the_block() -> None:
    from statemachines.session import State, Trigger

    generated = block()
    assert generated.startswith(BEGIN)
    assert generated.endswith(END)
    for state in State:
        assert f"`{state.name}`" in generated
    for trigger in Trigger:
        assert f"`{trigger.value}`" in generated
