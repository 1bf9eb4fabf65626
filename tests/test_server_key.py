"""The server key file: made once, whole, even when several workers boot together."""

import os
import time
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOAD = ("import sys, time; sys.path.insert(0, sys.argv[1]); import crypto\n"
        "time.sleep(max(0, float(sys.argv[3]) - time.time()))\n"
        "key = crypto.ServerKey.load(None, sys.argv[2])\n"
        "print(key.iss_fingerprint(b'probe'))")


def test_workers_booting_together_agree_on_one_key(tmp_path):
    for round_ in range(5):
        path = str(tmp_path / f"server-{round_}.key")
        start = str(time.time() + 0.5)
        procs = [subprocess.Popen([sys.executable, "-c", LOAD, ROOT, path, start],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
        results = [p.communicate(timeout=30) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err for _, err in results]
        assert len({out for out, _ in results}) == 1
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert sorted(os.listdir(tmp_path)) == sorted(
            f"server-{i}.key" for i in range(round_ + 1))  # no temporary files left


def test_operator_given_key_is_used_and_no_file_is_made(tmp_path):
    import crypto
    hex_key = "11" * 32
    a = crypto.ServerKey.load(hex_key, str(tmp_path / "server.key"))
    b = crypto.ServerKey(bytes.fromhex(hex_key))
    assert a.iss_fingerprint(b"x") == b.iss_fingerprint(b"x")
    assert not (tmp_path / "server.key").exists()
