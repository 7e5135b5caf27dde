"""Settings: environment parsing, precedence, validation and redaction of secrets."""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.errors import ConfigurationError
from coordinator.settings import Settings, redact_url

SECRET_URL = "redis://user:s3cret@host:1/0"


def test_defaults_without_environment() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.namespace == "default"
    assert s.redis_url is None
    assert s.partitions == 1
    assert s.enforce_policy is False
    assert s.auth == "off"


def test_from_env_parses_every_kind_of_value() -> None:
    env = {
        "SIDECAR_REDIS_URL": "redis://127.0.0.1:6390/2",
        "SIDECAR_NATS_URL": "nats://127.0.0.1:4333",
        "SIDECAR_NAMESPACE": "prod-eu_1",
        "SIDECAR_HEARTBEAT_INTERVAL": "0.25",
        "SIDECAR_MEMBER_TTL": "1",
        "SIDECAR_PARTITIONS": "4",
        "SIDECAR_BATCH_SIZE": "64",
        "SIDECAR_ENFORCE_POLICY": "yes",
        "SIDECAR_AUTH": "required",
        "SIDECAR_PEER_SECRET": "pss",
        "SIDECAR_DASHBOARD_USER": "admin",
        "UNRELATED": "ignored",
        "SIDECAR_PUBLISH_BUFFER": "",  # empty means unset
    }
    s = Settings.from_env(env)
    assert s.redis_url == "redis://127.0.0.1:6390/2"
    assert s.nats_url == "nats://127.0.0.1:4333"
    assert s.namespace == "prod-eu_1"
    assert s.heartbeat_interval == 0.25 and isinstance(s.heartbeat_interval, float)
    assert s.member_ttl == 1.0 and isinstance(s.member_ttl, float)
    assert s.partitions == 4 and isinstance(s.partitions, int)
    assert s.batch_size == 64
    assert s.enforce_policy is True
    assert s.auth == "required"
    assert s.peer_secret == "pss"
    assert s.dashboard_user == "admin"
    assert s.publish_buffer == Settings().publish_buffer


@pytest.mark.parametrize(("raw", "expected"), [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), (" on ", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_bool_spellings(raw: str, expected: bool) -> None:
    assert Settings.from_env({"SIDECAR_ENFORCE_POLICY": raw}).enforce_policy is expected


@pytest.mark.parametrize(("var", "raw", "kind"), [
    ("SIDECAR_ENFORCE_POLICY", "maybe", "bool"),
    ("SIDECAR_PARTITIONS", "two", "int"),
    ("SIDECAR_PARTITIONS", "1.5", "int"),
    ("SIDECAR_MEMBER_TTL", "3s", "float"),
])
def test_unparseable_values_name_the_variable(var: str, raw: str, kind: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({var: raw})
    assert var in str(info.value)
    assert repr(raw) in str(info.value)
    assert kind in str(info.value)


def test_precedence_override_then_env_then_default() -> None:
    env = {"SIDECAR_NAMESPACE": "from-env", "SIDECAR_BATCH_SIZE": "7"}
    s = Settings.from_env(env, namespace="from-flag", batch_size=None)
    assert s.namespace == "from-flag"   # flag beats env
    assert s.batch_size == 7            # None flag means "not given": env wins
    assert s.partitions == 1            # neither: default
    assert Settings.from_env({}, namespace="x").namespace == "x"


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_NAMESPACE", "envns")
    monkeypatch.setenv("SIDECAR_ROUTER_LEASE", "0.6")
    s = Settings.from_env()
    assert s.namespace == "envns"
    assert s.router_lease == 0.6


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="unknown settings: bogus"):
        Settings.from_env({}, bogus=1)


def test_member_ttl_must_cover_two_heartbeats() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(heartbeat_interval=1.0, member_ttl=1.5)
    text = str(info.value)
    assert "member_ttl" in text and "heartbeat_interval" in text and "twice" in text
    assert Settings(heartbeat_interval=1.0, member_ttl=2.0).member_ttl == 2.0
    with pytest.raises(ConfigurationError, match="member_ttl"):
        Settings.from_env({"SIDECAR_HEARTBEAT_INTERVAL": "2"})


@pytest.mark.parametrize("namespace", ["", "has space", "a.b", "a:b", "{x}", "n" * 65, "ümlaut"])
def test_bad_namespace(namespace: str) -> None:
    with pytest.raises(ConfigurationError, match="namespace"):
        Settings(namespace=namespace)


def test_good_namespace_edge() -> None:
    assert Settings(namespace="n" * 64).namespace == "n" * 64


def test_auth_value() -> None:
    with pytest.raises(ConfigurationError, match=r"auth must be 'off' or 'required'.*'maybe'"):
        Settings(auth="maybe")
    assert Settings(auth="required").auth == "required"


@pytest.mark.parametrize("url", ["localhost:6379", "redis", "127.0.0.1"])
def test_bad_url(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"redis_url is not a URL"):
        Settings(redis_url=url)
    with pytest.raises(ConfigurationError, match=r"nats_url is not a URL"):
        Settings(nats_url=url)


@pytest.mark.parametrize(("field", "value"), [
    ("heartbeat_interval", 0), ("request_timeout", -1.0), ("router_lease", 0.1),
    ("partitions", 0), ("batch_size", 0), ("max_payload_bytes", 0), ("router_linger", -0.001),
    ("router_linger", 0.5),
])
def test_out_of_range_numbers(field: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=field):
        Settings(**{field: value})


def test_task_expiry_must_cover_beat_lease() -> None:
    with pytest.raises(ConfigurationError, match="task_expiry"):
        Settings(beat_lease=2.0, task_expiry=1.0)


def test_settings_are_frozen_and_replace_validates() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.namespace = "other"  # type: ignore[misc]
    assert s.replace(namespace="other").namespace == "other"
    assert s.namespace == "default"
    with pytest.raises(ConfigurationError):
        s.replace(member_ttl=0.5)


def test_derived_timings() -> None:
    s = Settings(router_lease=3.0)
    assert s.lease_renew_interval == pytest.approx(1.0)
    assert s.router_block_ms == 500  # blocks at most half a renewal interval
    assert Settings(router_lease=0.2).router_block_ms >= 10


def test_redact_url() -> None:
    assert redact_url(SECRET_URL) == "redis://user:***@host:1/0"
    assert redact_url("redis://:pw@h:2") == "redis://:***@h:2"
    assert redact_url("redis://h:2/0") == "redis://h:2/0"
    assert redact_url(None) is None


def test_repr_and_describe_hide_every_secret() -> None:
    s = Settings(redis_url=SECRET_URL, nats_url="nats://n:natspw@h:4222", peer_secret="peer-pss",
                 dashboard_user="admin", dashboard_password="dash-pw")
    for text in (repr(s), str(s), str(s.describe())):
        assert "s3cret" not in text
        assert "natspw" not in text
        assert "peer-pss" not in text
        assert "dash-pw" not in text
    d = s.describe()
    assert d["redis_url"] == "redis://user:***@host:1/0"
    assert d["peer_secret"] == "***"
    assert d["dashboard_password"] == "***"
    assert d["dashboard_user"] == "admin"
    assert d["namespace"] == "default"
    assert "redis_url='redis://user:***@host:1/0'" in repr(s)
    assert Settings().describe()["peer_secret"] is None


def test_secrets_from_env_stay_hidden() -> None:
    s = Settings.from_env({"SIDECAR_REDIS_URL": SECRET_URL, "SIDECAR_PEER_SECRET": "zz-pss",
                           "SIDECAR_DASHBOARD_PASSWORD": "zz-dpw"})
    assert s.redis_url == SECRET_URL
    assert "s3cret" not in repr(s) and "zz-pss" not in repr(s) and "zz-dpw" not in repr(s)


def test_validation_error_does_not_leak_password_of_a_valid_url() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(redis_url=SECRET_URL, namespace="bad ns")
    assert "s3cret" not in str(info.value)


# Regression (fixed) (coordinator/settings.py, __post_init__, the "is not a URL" check): a malformed URL
# that still carries credentials (here the ':' after the scheme is missing) is echoed back through
# redact_url(), which only masks passwords urlsplit() can find, so the password lands in the error
# message and from there in logs. Fix: never echo a malformed URL, or mask "user:<pw>@" with a
# regex such as re.sub(r":[^:@/]*@", ":***@", url) before putting it in the message.
def test_malformed_url_error_does_not_leak_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(redis_url="redis//user:s3cret@host:1/0")
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("site", ["nats", "a b", "x" * 33])
def test_bad_or_reserved_site(site: str) -> None:
    with pytest.raises(ConfigurationError, match="site"):
        Settings(site=site)
