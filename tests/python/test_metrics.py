"""The admin listener's /metrics, scraped over HTTP and parsed with the Prometheus client
library's OpenMetrics parser: the figures move when commands run."""

import urllib.error
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from conftest import Server
from wire import until_closed


@pytest.fixture(params=["dir", "s3"])
def admin_server(request):
    s = Server(request.param, extra_env={"S3CACHED_ADMIN_LISTEN": "127.0.0.1:0"})
    yield s
    s.stop()


def scrape(server):
    with urllib.request.urlopen(server.admin + "/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def talk(address, lines):
    """Sends memcached requests on one connection; returns the replies."""
    return until_closed(address, b"".join(lines) + b"quit\r\n", timeout=30)


def test_metrics_move_with_commands(admin_server):
    before = scrape(admin_server)
    sets = [b"set m%d 0 0 5\r\nhello\r\n" % i for i in range(5)]
    gets = [b"get m%d\r\n" % i for i in range(5)] + [b"get nothere\r\n"]
    replies = talk(admin_server.address, sets + gets)
    assert replies.count(b"STORED") == 5 and replies.count(b"VALUE") == 5
    after = scrape(admin_server)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("s3cached_commands_total", command="set", result="stored") == 5
    assert moved("s3cached_commands_total", command="get", result="hit") == 5
    assert moved("s3cached_commands_total", command="get", result="miss") == 1
    assert moved("s3cached_command_duration_seconds_count", command="set", result="stored") == 5
    assert moved("s3cached_command_duration_seconds_sum", command="set", result="stored") > 0
    inf = value(after, "s3cached_command_duration_seconds_bucket", command="set", result="stored", le="+Inf")
    assert inf == value(after, "s3cached_command_duration_seconds_count", command="set", result="stored")
    assert moved("s3cached_cmd_set_total") == 5
    assert moved("s3cached_get_hits_total") == 5
    assert moved("s3cached_get_misses_total") == 1
    assert moved("s3cached_total_connections_total") >= 1
    assert moved("s3cached_bytes_read_total") > 0
    assert moved("s3cached_bytes_written_total") > 0
    assert ("s3cached_curr_connections", ()) in after
    assert ("s3cached_flush_epoch_seconds", ()) in after
    if admin_server.backend == "s3":
        assert moved("s3cached_s3_requests_total", **{"class": "put"}) >= 5
        assert moved("s3cached_s3_answers_total", answer="ok") >= 5
        assert moved("s3cached_s3_estimated_cost_usd_total") >= 5 * 0.005 / 1000
        assert value(after, "s3cached_s3_price_per_1000_requests_usd", **{"class": "put"}) == 0.005
        assert moved("s3cached_backend_request_duration_seconds_count", operation="PutObject", status="200") >= 5
    else:
        assert not any(name.startswith("s3cached_s3_") for name, _ in after)


def test_health_and_unknown_paths(admin_server):
    with urllib.request.urlopen(admin_server.admin + "/healthz", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(admin_server.admin + "/readyz", timeout=10) as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(admin_server.admin + "/nowhere", timeout=10)
    assert e.value.code == 404
    # The memcached port goes on regardless.
    assert talk(admin_server.address, [b"version\r\n"]).startswith(b"VERSION ")
