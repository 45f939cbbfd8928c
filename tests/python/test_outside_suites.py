"""Client libraries' own integration tests, run against s3cached on both backends.

pymemcache ships its integration suite in the installed package (pymemcache/test); its
conftest takes the server as `--server`/`--port`. It runs in a pytest of its own, so its
fixtures and options stay out of this suite.
"""

import importlib.util
import os
import subprocess
import sys

import pymemcache

PYMEMCACHE_TESTS = os.path.join(os.path.dirname(pymemcache.__file__), "test")


def run_pymemcache_suite(server, selection):
    """Runs pymemcache's integration tests matching `selection` against `server`; returns
    pytest's summary line after checking that every selected case passed."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        os.path.join(PYMEMCACHE_TESTS, "test_integration.py"),
        "-k",
        selection,
        "--server",
        server.address[0],
        "--port",
        str(server.address[1]),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return next(line for line in output.splitlines()[::-1] if " passed" in line)


def test_pymemcache_test_misc(server):
    # test_misc: flush_all, stats cachedump and cache_memlimit, once per client class
    # (Client, PooledClient, HashClient), socket module (socket, and gevent's when it is
    # installed) and key prefix: 12 cases with gevent, 6 without.
    cases = 12 if importlib.util.find_spec("gevent") else 6
    summary = run_pymemcache_suite(server, "test_misc")
    assert summary.startswith(f"{cases} passed"), summary
