"""Four gunicorn workers under sixteen concurrent clients: no 5xx, no lock errors, no lost write.

Each client thread owns one user, so whatever worker answers, what the thread reads back must
be exactly what it wrote before. The expected state is built only from acknowledged answers.
"""

import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from servers import Gunicorn, call, cli, cli_token, pushkey_path

THREADS = 16
OPS_PER_THREAD = 24
KEYS_PER_THREAD = 4
APP_IDS = ("com.example.a", "com.example.b")
CHANNELS = {"c1": "enabled", "c2": "disabled", "c3": "disabled"}
GATEWAY = "http://127.0.0.1:9/_matrix/push/v1/notify"  # never called: no delivery worker runs


@pytest.fixture
def env(tmp_path, server_env):
    return server_env(tmp_path / "instance", RATE_LIMIT_ENABLED=False, EMBEDDED_WORKER=False,
                    ALLOW_HTTP_GATEWAYS=True)


@pytest.fixture
def server(env, tmp_path):
    """Four workers booting together on an instance folder that does not exist yet."""
    with Gunicorn(env, workers=4, log_dir=tmp_path) as server:
        yield server


class Client:
    """One thread's user: sends a random mix of requests and keeps what the server acknowledged."""

    def __init__(self, port, number, token, service_token):
        self.port = port
        self.user_id = f"user{number}"
        self.token = token
        self.service_token = service_token
        self.random = random.Random(number)
        # base64-like pushkeys: the routes must take "/", "+" and "=" in them
        self.pushkeys = [f"t{number}/k{k}+=" for k in range(KEYS_PER_THREAD)]
        self.pushers = {}  # (app_id, pushkey) -> device_display_name, in creation order
        self.states = {}  # pushkey -> {channel: "enabled" | "disabled"}
        self.statuses = []  # (request, status, body) of every answer, for the 5xx check

    def request(self, method, path, body=None, token=None):
        status, answer = call(self.port, method, path, body, token or self.token)
        self.statuses.append((f"{method} {path}", status, answer))
        return status, answer

    def run(self):
        """The thread's workload; returns the client for the checks."""
        actions = [self.set_pusher] * 5 + [self.delete_pusher] * 2 + [self.set_channels] * 4 + [
            self.notify] * 2 + [self.check_pushers, self.check_channels]
        for _ in range(OPS_PER_THREAD):
            self.random.choice(actions)()
        return self

    def set_pusher(self):
        app_id, pushkey = self.random.choice(APP_IDS), self.random.choice(self.pushkeys)
        name = f"phone-{self.random.randrange(10**6)}"
        body = {"kind": "http", "app_id": app_id, "pushkey": pushkey, "app_display_name": "App",
                "device_display_name": name, "lang": "en", "data": {"url": GATEWAY}}
        status, answer = self.request("POST", "/push/v1/pushers/set", body)
        assert (status, answer) == (200, {}), (body, status, answer)
        self.pushers[app_id, pushkey] = name  # an update keeps its place in the order

    def delete_pusher(self):
        app_id, pushkey = self.random.choice(APP_IDS), self.random.choice(self.pushkeys)
        body = {"kind": None, "app_id": app_id, "pushkey": pushkey}
        status, answer = self.request("POST", "/push/v1/pushers/set", body)
        assert (status, answer) == (200, {}), (body, status, answer)
        self.pushers.pop((app_id, pushkey), None)
        if not self.has_device(pushkey):
            self.states.pop(pushkey, None)  # the device's states go with its last pusher

    def set_channels(self):
        pushkey = self.random.choice(self.pushkeys)
        changes = [{"name": c, "value": self.random.choice(["enabled", "disabled", "not_set"])}
                   for c in self.random.sample(sorted(CHANNELS), self.random.randint(1, 3))]
        status, answer = self.request("POST", "/push/v1/channels/" + pushkey_path(pushkey),
                                      {"channels": changes})
        if not self.has_device(pushkey):
            assert status == 404, (pushkey, status, answer)
            return
        assert (status, answer) == (200, {}), (pushkey, changes, status, answer)
        states = self.states.setdefault(pushkey, {})
        for change in changes:
            states[change["name"]] = change["value"]  # not_set is a state like the others

    def notify(self):
        channel = self.random.choice(sorted(CHANNELS))
        body = {"user_id": self.user_id, "channel": channel, "payload": {"n": 1}}
        status, answer = self.request("POST", "/push/v1/notifications", body,
                                      token=self.service_token)
        assert status == 202, (body, status, answer)
        expected = sum(1 for _, pushkey in self.pushers if self.gets(pushkey, channel))
        assert answer["deliveries"] == expected, (body, answer, self.pushers, self.states)

    def check_pushers(self):
        status, answer = self.request("GET", "/push/v1/pushers")
        assert status == 200, (status, answer)
        found = [(p["app_id"], p["pushkey"], p["device_display_name"]) for p in answer["pushers"]]
        assert found == [(a, k, name) for (a, k), name in self.pushers.items()]

    def check_channels(self, pushkey=None):
        pushkey = pushkey or self.random.choice(self.pushkeys)
        status, answer = self.request("GET", "/push/v1/channels/" + pushkey_path(pushkey))
        if not self.has_device(pushkey):
            assert status == 404, (pushkey, status, answer)
            return
        assert status == 200, (pushkey, status, answer)
        states = self.states.get(pushkey, {})
        assert {c["id"]: c["status"] for c in answer["channels"]} == {
            c: states.get(c, default) for c, default in CHANNELS.items()}, pushkey

    def has_device(self, pushkey):
        return any(k == pushkey for _, k in self.pushers)

    def gets(self, pushkey, channel):
        """Whether this device receives ``channel``: its own state (not_set is not enabled),
        else the default."""
        return self.states.get(pushkey, {}).get(channel, CHANNELS[channel]) == "enabled"


def test_concurrent_clients_on_four_workers_lose_nothing(server, env):
    booted = server.worker_pids()
    assert len(set(booted)) == 4, server.log()  # schema creation raced in all four, none failed

    # The CLI writes to the same database while the server runs.
    with ThreadPoolExecutor(4) as pool:
        channel_runs = [pool.submit(cli, env, "channels", "add", c, "--default", d)
                        for c, d in CHANNELS.items()]
        service_token = pool.submit(cli_token, env, "services", "create", "erp").result()
        tokens = list(pool.map(lambda n: cli_token(env, "users", "create", f"user{n}"),
                               range(THREADS)))
        for run in channel_runs:
            run.result()

    clients = [Client(server.port, n, tokens[n], service_token) for n in range(THREADS)]
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(client.run) for client in clients]
        for future in futures:
            future.result(timeout=300)  # a safety bound, not a speed target

    for client in clients:  # the final state, read back after all writers are done
        client.check_pushers()
        for pushkey in client.pushkeys:
            client.check_channels(pushkey)

    answers = [s for client in clients for s in client.statuses]
    assert len(answers) >= THREADS * OPS_PER_THREAD
    assert [a for a in answers if a[1] >= 500] == []
    log = server.log()
    assert "database is locked" not in log
    assert "Traceback" not in log, log
    assert all(os.path.exists(f"/proc/{pid}") for pid in booted), log  # no worker died
    assert server.worker_pids() == booted, log  # and none was replaced


def test_a_revoked_token_is_refused_at_once_by_every_worker(server, env):
    """The workers' threads keep their database connections between requests; the first
    request after a revocation is refused by each of them all the same."""
    token = cli_token(env, "users", "create", "mallory")

    def wave():
        with ThreadPoolExecutor(THREADS) as pool:  # at once: every worker, many threads
            return list(pool.map(lambda _: call(server.port, "GET", "/push/v1/pushers",
                                                token=token)[0], range(4 * THREADS)))

    assert wave() == [200] * 4 * THREADS
    cli(env, "users", "revoke", "mallory")
    assert wave() == [401] * 4 * THREADS
