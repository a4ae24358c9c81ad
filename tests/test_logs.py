"""poller.logs: what --log-level DEBUG may show. Third-party loggers stay at WARNING unless named
in POLLER_DEBUG_LOGGERS, and the handler's redacting filter keeps credentials out of every line.

The last tests run botocore's own DEBUG logging through setup_logging: a request to LocalStack
signed with a session token, and IRSA's flow (AssumeRoleWithWebIdentity against a fake STS, then
SQS with the temporary credentials). ``FakeSts`` is in tests/support.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from poller.logs import DEBUG_LOGGERS_ENV, THIRD_PARTY_LOGGERS, Redactor, setup_logging

from support import JWT, SECRET_KEY, SESSION_TOKEN, STATIC_CREDENTIALS, FakeSts

# Recognisable fakes, the shapes real ones have (JWT, SECRET_KEY, SESSION_TOKEN: tests/support.py).
SASL_PASSWORD = "sasl-pw-0123456789"
BASIC = "dXNlcjpzM2NyZXQtcGFzc3dvcmQ="  # user:s3cret-password


# -- the redactor -------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "secret"), [
    # botocore's DEBUG lines, as they look
    (f"Sending http request: <AWSPreparedRequest stream_output=False, method=POST, url=http://sqs/, "
     f"headers={{'X-Amz-Target': b'AmazonSQS.ReceiveMessage', 'X-Amz-Security-Token': b'{SESSION_TOKEN}', "
     f"'Authorization': b'AWS4-HMAC-SHA256 Credential=ASIAFAKE/20260101/us-east-1/sqs/aws4_request, "
     f"SignedHeaders=host, Signature=0123abcd'}}>", SESSION_TOKEN),
    (f"Making request with params: {{'body': {{'Action': 'AssumeRoleWithWebIdentity', 'WebIdentityToken': '{JWT}'}}}}",
     JWT),
    (f"body=b'Action=AssumeRoleWithWebIdentity&Version=2011-06-15&WebIdentityToken={JWT}&RoleArn=arn'", JWT),
    (f"Response body:\nb'<Credentials><AccessKeyId>ASIAFAKE</AccessKeyId>\\n<SecretAccessKey>{SECRET_KEY}"
     f"</SecretAccessKey>\\n<SessionToken>{SESSION_TOKEN}</SessionToken>'", SECRET_KEY),
    (f"<SessionToken>{SESSION_TOKEN}</SessionToken>", SESSION_TOKEN),
    (f"CanonicalRequest:\nPOST\n/\n\nhost:sqs\nx-amz-security-token:{SESSION_TOKEN}\n", SESSION_TOKEN),
    (f"ReadOnlyCredentials(access_key='ASIAFAKE', secret_key='{SECRET_KEY}', token='{SESSION_TOKEN}')", SECRET_KEY),
    (f"ReadOnlyCredentials(access_key='ASIAFAKE', secret_key='{SECRET_KEY}', token='{SESSION_TOKEN}')", SESSION_TOKEN),
    # environment, JSON (credential_process, container credentials), query strings
    (f"AWS_SECRET_ACCESS_KEY={SECRET_KEY} AWS_SESSION_TOKEN={SESSION_TOKEN}", SECRET_KEY),
    (f'export AWS_SESSION_TOKEN="{SESSION_TOKEN}"', SESSION_TOKEN),
    ("AWS_SECRET_ACCESS_KEY=testtest", "testtest"),
    (f'{{"Version": 1, "AccessKeyId": "ASIAFAKE", "SecretAccessKey": "{SECRET_KEY}", "SessionToken": "x"}}',
     SECRET_KEY),
    (f'{{"SessionToken": "{SESSION_TOKEN}"}}', SESSION_TOKEN),
    (f'"{{\\"SessionToken\\": \\"{SESSION_TOKEN}\\"}}"', SESSION_TOKEN),
    (f"https://queue.example/?X-Amz-Security-Token={SESSION_TOKEN}&X-Amz-Date=1", SESSION_TOKEN),
    (f"WebIdentityToken={JWT}", JWT),
    (f"the token file holds {JWT}", JWT),  # a JWT without a key in front
    # HTTP and Kafka credentials
    (f"Authorization: Basic {BASIC}", BASIC),
    (f"header was Basic {BASIC}", BASIC),
    (f"Proxy-Authorization: Bearer {JWT}", JWT),
    (f"sasl.password={SASL_PASSWORD}, sasl.username=poller", SASL_PASSWORD),
    (f"{{'sasl.password': '{SASL_PASSWORD}', 'bootstrap.servers': 'b-1:9098'}}", SASL_PASSWORD),
    (f"ssl.key.password: {SASL_PASSWORD}", SASL_PASSWORD),
    ("sink https://poller:s3cret-password@sink.example/ answered", "s3cret-password"),
    ("key -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----", "MIIEvQIBADAN"),
])
def test_the_redactor_hides_every_credential_shape(text: str, secret: str) -> None:
    shown = Redactor()(text)
    assert secret not in shown, shown
    assert "***" in shown


@pytest.mark.parametrize("line", [
    "polling http://127.0.0.1:4566/queue/us-east-1/000000000000/orders -> http channel sink "
    "http://127.0.0.1:8080/ (binary, data=message) with 2 process(es)",
    "received 100 (50/s) | acked 100 | deleted 100 | in-flight 0 | retried 0 returned 0 rejected 0",
    "rejected message 5fea7756-0ea4-451a-a703-a558b933e274: sink http://sink/ answered HTTP 400; left to the "
    "queue's redrive policy",
    "Found credentials in environment variables.",
    "Basic authentication is sent for user:password@ in the sink URL",
    # LocalStack's dummy credentials, in `poller demo`'s hint: not secrets
    "send one of your own: AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test aws sqs send-message",
])
def test_the_redactor_leaves_ordinary_lines_alone(line: str) -> None:
    assert Redactor()(line) == line


def test_secret_values_from_the_environment_are_hidden_wherever_they_appear() -> None:
    redact = Redactor.from_environment({"AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_SESSION_TOKEN": "test"})
    assert redact(f"a message that quotes {SECRET_KEY} bare") == "a message that quotes *** bare"
    assert redact("queue test-orders") == "queue test-orders"  # too short to be a real secret: kept


# -- setup_logging ------------------------------------------------------------------------------


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """setup_logging replaces the root handlers and sets levels: put them back after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    names = (*THIRD_PARTY_LOGGERS, "poller", "channels.kafka")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_every_line_through_the_handler_is_redacted(
    restored_logging: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, log_format: str
) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    monkeypatch.setenv(DEBUG_LOGGERS_ENV, "botocore")
    setup_logging("DEBUG", log_format)
    logging.getLogger("poller.worker").debug("sent with token=%s", SESSION_TOKEN)
    logging.getLogger("botocore.endpoint").debug("headers={'X-Amz-Security-Token': b'%s'}", SESSION_TOKEN)
    logging.getLogger("poller").info("credential_process said %s", {"SecretAccessKey": SECRET_KEY})
    logging.getLogger("channels.kafka").warning("conf sasl.password=%s", SASL_PASSWORD)
    logging.getLogger("poller").info("a bare token %s", SESSION_TOKEN)  # the environment's value
    try:
        raise ValueError(f"bad header Authorization: Basic {BASIC}")
    except ValueError:
        logging.getLogger("poller").exception("failed with %s", JWT)
    logging.getLogger("poller").info("bad arguments %d", "not a number")
    err = capsys.readouterr().err
    for secret in (SESSION_TOKEN, SECRET_KEY, SASL_PASSWORD, BASIC, JWT):
        assert secret not in err, err
    assert err.count("***") >= 7, err
    assert "bad arguments" in err and "Traceback" not in err.split("bad arguments")[1]


def test_debug_leaves_third_party_loggers_at_warning(
    restored_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DEBUG_LOGGERS_ENV, raising=False)
    setup_logging("DEBUG")
    for name in THIRD_PARTY_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
    assert logging.getLogger("botocore.endpoint").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("poller.worker").getEffectiveLevel() == logging.DEBUG  # the poller's own
    assert logging.getLogger("channels.kafka").getEffectiveLevel() == logging.DEBUG


def test_named_loggers_are_turned_to_debug(restored_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEBUG_LOGGERS_ENV, " botocore, librdkafka ,")
    setup_logging("INFO")
    assert logging.getLogger("botocore.endpoint").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("channels.kafka.librdkafka").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("urllib3").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("poller.worker").getEffectiveLevel() == logging.INFO


# -- botocore's own DEBUG lines, for real -----------------------------------------------------




@pytest.mark.integration
@pytest.mark.parametrize("named", ["botocore,urllib3", ""])
def test_botocore_debug_of_a_request_with_a_session_token_never_shows_it(
    restored_logging: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    sqs_endpoint: str, named: str
) -> None:
    """A botocore SQS client signing with a session token, at --log-level DEBUG; asked for by
    name, botocore logs the request with its X-Amz-Security-Token header, and the token is
    redacted; not asked for, botocore says nothing."""
    import botocore.session

    monkeypatch.setenv(DEBUG_LOGGERS_ENV, named)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)  # the filter must not rely on the environment
    setup_logging("DEBUG")
    client = botocore.session.Session().create_client(
        "sqs", region_name="us-east-1", endpoint_url=sqs_endpoint, aws_access_key_id="test",
        aws_secret_access_key=SECRET_KEY, aws_session_token=SESSION_TOKEN)
    client.list_queues(MaxResults=1)
    err = capsys.readouterr().err
    assert SESSION_TOKEN not in err and SECRET_KEY not in err
    if named:
        assert "X-Amz-Security-Token': b'***'" in err, err[-3000:]
    else:
        assert "X-Amz-Security-Token" not in err and "ListQueues" not in err, err[-3000:]


@pytest.mark.integration
def test_the_irsa_flow_at_debug_never_shows_the_jwt_or_the_temporary_credentials(
    restored_logging: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    sqs_endpoint: str, tmp_path: Path
) -> None:
    """AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE, as EKS injects them: botocore sends the JWT to
    STS and logs the answer (secret key, session token) at DEBUG, then signs SQS with them."""
    import botocore.session

    sts = FakeSts()
    try:
        for name in STATIC_CREDENTIALS:
            monkeypatch.delenv(name, raising=False)
        for name, value in sts.environment(tmp_path / "token").items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv(DEBUG_LOGGERS_ENV, "botocore,urllib3")
        setup_logging("DEBUG", "json")
        session = botocore.session.Session()
        credentials = session.get_credentials().get_frozen_credentials()
        assert credentials.token == SESSION_TOKEN and sts.calls == 1  # the flow did run
        session.create_client("sqs", region_name="us-east-1", endpoint_url=sqs_endpoint).list_queues(MaxResults=1)
    finally:
        sts.close()
    err = capsys.readouterr().err
    assert "AssumeRoleWithWebIdentity" in err and "SessionToken" in err, err[-3000:]  # botocore did log it
    for secret in (JWT, SECRET_KEY, SESSION_TOKEN):
        assert secret not in err
