"""The example configuration shipped in systemd/ stays valid."""

from pathlib import Path

from daemon.config import load_config, resolve_secrets

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "wirekeep.toml"


def test_example_config_is_valid_with_its_credentials(tmp_path: Path) -> None:
    config = load_config(EXAMPLE)
    for name in ("venue_a_key", "broker_b_secret", "broker_b_token"):
        (tmp_path / name).write_text(f"secret-{name}\n")
    secrets = resolve_secrets(config, {}, str(tmp_path))
    assert config.session_names == ("venue-a", "broker-b")
    assert "secret-venue_a_key" in config.secret_values(secrets)
