"""channels.http.redact: what logs and reasons show of a sink URL. Userinfo never; of the path and
the query only plain words (1-20 lowercase letters, ``-``, ``_``, or ``v1``-style versions); query
values and fragments never. (tests/test_http_channel.py has the userinfo and query cases.)"""

from __future__ import annotations

import pytest

from channels.http import redact


@pytest.mark.parametrize(("url", "shown"), [
    # webhook URLs: the secret is a path segment
    ("https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
     "https://hooks.slack.com/services/***/***/***"),
    ("https://hooks.example/T0/B0/XXXXSECRET", "https://hooks.example/***/***/***"),
    ("https://example.webhook.office.com/webhookb2/6f1c2e3a-aaaa-bbbb@cccc/IncomingWebhook/abc123/def",
     "https://example.webhook.office.com/***/***/***/***/def"),
    ("https://api.example/hooks/catch/1234567/abcd3fg/", "https://api.example/hooks/catch/***/***/"),
    # plain paths stay readable: Knative brokers and channels, API versions
    ("http://broker-ingress.knative-eventing.svc.cluster.local/default/my-broker",
     "http://broker-ingress.knative-eventing.svc.cluster.local/default/my-broker"),
    ("http://sink:8080/api/v1/events/", "http://sink:8080/api/v1/events/"),
    ("http://sink", "http://sink"),
    ("http://sink/", "http://sink/"),
    ("http://sink//double", "http://sink//double"),
    # anything not a plain word: capitals, digits, dots, escapes, long words
    ("http://sink/Events", "http://sink/***"),
    ("http://sink/index.html", "http://sink/***"),
    ("http://sink/a%2Fb", "http://sink/***"),
    ("http://sink/averyveryverylongwordindeed", "http://sink/***"),
    # query keys by the same rule, values and fragments always hidden
    ("http://sink/in?A1B2C3D4SECRET", "http://sink/in?***=***"),
    ("http://sink/in?api_key=abc&v=2", "http://sink/in?api_key=***&v=***"),
    ("http://sink/#s3cr3t", "http://sink/#***"),
    ("https://u:p@sink:8443/T0/xyz?sig=1#f", "https://sink:8443/***/xyz?sig=***#***"),
])
def test_redact_keeps_only_plain_words_of_path_and_query(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_redact_of_an_unparsable_url_shows_none_of_it() -> None:
    assert redact("http://[::1:80/SECRET") == "<an unparsable URL>"
