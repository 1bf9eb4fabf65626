"""The key ratchet, padding and sealing (SPEC section 4) against the published vectors."""

import base64
import json
import os
import stat

import pytest
from cryptography.exceptions import InvalidTag

import crypto

# A copy of ../shared/vectors/crypto.json, kept in the repo so the tests do not depend on
# what sits beside the checkout; test_vectors_copy_matches_the_shared_file checks it is current.
VECTORS_PATH = os.path.join(os.path.dirname(__file__), "vectors", "crypto.json")
SHARED_VECTORS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "vectors",
                              "crypto.json")
with open(VECTORS_PATH) as f:
    VECTORS = json.load(f)

CHAINS = VECTORS["chains"]
PADDING = VECTORS["padding"]
SEALING = VECTORS["sealing"]


@pytest.mark.skipif(not os.path.exists(SHARED_VECTORS), reason="no ../shared beside the checkout")
def test_vectors_copy_matches_the_shared_file():
    with open(SHARED_VECTORS) as f:
        assert json.load(f) == VECTORS


def as_hex(generation):
    return {"period": generation.period, "secret": generation.secret.hex(),
            "aes_key": generation.aes_key.hex()}


@pytest.mark.parametrize("chain", CHAINS, ids=[c["initial_key_period"] for c in CHAINS])
def test_first_generation_matches_vector(chain):
    generation = crypto.first_generation(bytes.fromhex(chain["iss"]), chain["initial_key_period"])
    assert as_hex(generation) == chain["generations"][0]


@pytest.mark.parametrize("chain", CHAINS, ids=[c["initial_key_period"] for c in CHAINS])
def test_every_generation_of_the_chain_matches_vector(chain):
    generation = crypto.first_generation(bytes.fromhex(chain["iss"]), chain["initial_key_period"])
    derived = [as_hex(generation)]
    for expected in chain["generations"][1:]:
        generation = crypto.ratchet(generation, expected["period"])
        derived.append(as_hex(generation))
    assert derived == chain["generations"]
    assert len(derived) >= 3


@pytest.mark.parametrize("chain", CHAINS, ids=[c["initial_key_period"] for c in CHAINS])
def test_ratchet_jumps_several_months_in_one_call(chain):
    first = crypto.first_generation(bytes.fromhex(chain["iss"]), chain["initial_key_period"])
    last = chain["generations"][-1]
    assert as_hex(crypto.ratchet(first, last["period"])) == last


def test_ratchet_step_uses_previous_secret_as_ikm():
    chain = CHAINS[0]
    previous, expected = chain["generations"][0], chain["generations"][1]
    step = crypto.derive(bytes.fromhex(previous["secret"]), expected["period"])
    assert as_hex(step) == expected


def test_ratchet_crosses_the_year_boundary():
    chain = CHAINS[0]  # 2023-10 .. 2024-01
    december = next(g for g in chain["generations"] if g["period"] == "2023-12")
    january = next(g for g in chain["generations"] if g["period"] == "2024-01")
    generation = crypto.Generation("2023-12", bytes.fromhex(december["secret"]),
                                   bytes.fromhex(december["aes_key"]))
    assert as_hex(crypto.ratchet(generation, "2024-01")) == january
    assert crypto.next_period("2023-12") == "2024-01"
    assert crypto.next_period("2024-01") == "2024-02"


def test_ratchet_leaves_a_generation_ahead_of_the_target_as_is():
    chain = CHAINS[0]
    latest = chain["generations"][-1]  # 2024-01
    ahead = crypto.Generation(latest["period"], bytes.fromhex(latest["secret"]),
                              bytes.fromhex(latest["aes_key"]))
    assert crypto.ratchet(ahead, "2023-11") is ahead
    assert crypto.ratchet(ahead, "2024-01") is ahead


@pytest.mark.parametrize("period", ["2024-13", "2024-00", "2024-1", "24-01", "2024/01", "abcd-ef",
                                    "2024-011", ""])
def test_bad_periods_are_refused(period):
    with pytest.raises(ValueError):
        crypto.derive(b"\x00" * 32, period)


def test_padding_matches_vector():
    block = crypto.pad(PADDING["payload_utf8"].encode())
    assert len(block) == PADDING["padded_len"] == 1024
    assert block.hex().startswith(PADDING["padded_head_hex"])
    assert block.hex().endswith(PADDING["padded_tail_hex"])
    assert crypto.unpad(block) == PADDING["payload_utf8"].encode()


def test_padding_length_field_counts_the_spaces():
    payload = b"x" * 100
    block = crypto.pad(payload)
    padding = int.from_bytes(block[4:6], "big")
    assert block[:4] == b"PNM1"
    assert padding == 1024 - 6 - 100
    assert block[6:6 + padding] == b" " * padding
    assert block[6 + padding:] == payload


def test_pad_takes_exactly_1018_bytes_and_refuses_more():
    assert crypto.MAX_PAYLOAD_BYTES == 1018
    full = crypto.pad(b"y" * 1018)
    assert len(full) == 1024 and full[4:6] == b"\x00\x00"
    with pytest.raises(ValueError):
        crypto.pad(b"y" * 1019)


def test_sealing_with_fixed_nonce_matches_vector():
    sealed = crypto.seal(bytes.fromhex(SEALING["aes_key"]), SEALING["payload_utf8"].encode(),
                         nonce=bytes.fromhex(SEALING["nonce_hex"]))
    assert sealed == SEALING["ciphertext_b64"]
    assert len(sealed) == SEALING["ciphertext_b64_len"] == crypto.SEALED_B64_LEN == 1404


def test_sealing_vector_key_is_the_chain_key_of_its_period():
    chain = next(c for c in CHAINS
                 if any(g["aes_key"] == SEALING["aes_key"] for g in c["generations"]))
    generation = next(g for g in chain["generations"] if g["aes_key"] == SEALING["aes_key"])
    assert generation["period"] == SEALING["period"]


def test_open_sealed_round_trip_with_random_nonce():
    key = os.urandom(32)
    payload = '{"ChannelId":"erp.task.activate","ü":1}'.encode()
    first, second = crypto.seal(key, payload), crypto.seal(key, payload)
    assert first != second  # a fresh nonce each time
    assert len(first) == len(second) == 1404
    assert crypto.open_sealed(key, first) == payload
    assert crypto.open_sealed(key, second) == payload


def test_open_sealed_opens_the_vector():
    opened = crypto.open_sealed(bytes.fromhex(SEALING["aes_key"]), SEALING["ciphertext_b64"])
    assert opened == SEALING["payload_utf8"].encode()


def test_open_sealed_with_wrong_key_fails():
    sealed = crypto.seal(os.urandom(32), b"{}")
    with pytest.raises(InvalidTag):
        crypto.open_sealed(os.urandom(32), sealed)


def test_seal_refuses_a_payload_over_1018_bytes():
    with pytest.raises(ValueError):
        crypto.seal(os.urandom(32), b"z" * 1019)


def test_server_key_file_is_created_0600_and_reused(tmp_path):
    path = tmp_path / "server.key"
    first = crypto.ServerKey.load(None, str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(bytes.fromhex(path.read_text().strip())) == 32
    generation = crypto.first_generation(os.urandom(32), "2024-11")
    blob = first.seal_generation("kid", generation)
    again = crypto.ServerKey.load(None, str(path))
    assert again.open_generation("kid", "2024-11", blob) == generation


def test_server_key_given_by_operator_in_hex_or_base64(tmp_path):
    raw = os.urandom(32)
    from_hex = crypto.ServerKey.load(raw.hex(), str(tmp_path / "unused.key"))
    from_b64 = crypto.ServerKey.load(base64.b64encode(raw).decode(), str(tmp_path / "unused.key"))
    assert not (tmp_path / "unused.key").exists()
    generation = crypto.first_generation(os.urandom(32), "2024-11")
    assert from_b64.open_generation("k", "2024-11", from_hex.seal_generation("k", generation)) \
        == generation


def test_stored_generation_is_bound_to_key_identifier_and_period():
    server_key = crypto.ServerKey(os.urandom(32))
    generation = crypto.first_generation(os.urandom(32), "2024-11")
    blob = server_key.seal_generation("kid", generation)
    assert generation.secret not in blob and generation.aes_key not in blob
    with pytest.raises(InvalidTag):
        server_key.open_generation("other-kid", "2024-11", blob)
    with pytest.raises(InvalidTag):
        server_key.open_generation("kid", "2024-12", blob)


def test_iss_fingerprint_tells_same_iss_apart_without_revealing_it():
    server_key = crypto.ServerKey(os.urandom(32))
    iss, other = os.urandom(32), os.urandom(32)
    assert server_key.iss_fingerprint(iss) == server_key.iss_fingerprint(iss)
    assert server_key.iss_fingerprint(iss) != server_key.iss_fingerprint(other)
    assert iss.hex() not in server_key.iss_fingerprint(iss)
    # Keyed: another server key gives another fingerprint of the same iss.
    assert crypto.ServerKey(os.urandom(32)).iss_fingerprint(iss) != server_key.iss_fingerprint(iss)


def test_server_key_must_be_32_bytes():
    with pytest.raises(ValueError):
        crypto.ServerKey(b"short")
