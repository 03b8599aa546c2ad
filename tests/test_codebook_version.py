"""Stored codes and the codebooks that decode them: a session stored before the 5-8-bit codebooks changed
(quant/codebooks.py, CODEBOOK_VERSION) refuses to resume where its codes would decode differently."""

import json
import sqlite3

import grpc
import numpy as np
import pytest

from conftest import ShardProcess
from kvshard.client import NO_RETRY, Client

HEADS, DIM = 2, 64


def stored_before_the_version(db_path):
    """Every stored record as the previous release wrote it: without the codebooks field."""
    db = sqlite3.connect(db_path)
    for session_id, text in db.execute("SELECT session_id, record FROM sessions").fetchall():
        record = json.loads(text)
        del record["codebooks"]
        db.execute("UPDATE sessions SET record = ? WHERE session_id = ?", (json.dumps(record), session_id))
    db.commit()
    db.close()


def test_a_session_of_older_codebooks_resumes_only_where_its_codes_are_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    keys, values = (rng.standard_normal((HEADS, 24, DIM)).astype(np.float32) for _ in range(2))
    queries = rng.standard_normal((2 * HEADS, 3, DIM)).astype(np.float32)
    db_path = tmp_path / "kvshard.sqlite3"
    first = ShardProcess(tmp_path, "--model", "none").start()
    try:
        with Client(first.target, retry=NO_RETRY) as c:
            wide = c.create_cache(head_dim=DIM, n_kv_heads=HEADS, key_bits=6, value_bits=4, session_id="wide")
            narrow = c.create_cache(head_dim=DIM, n_kv_heads=HEADS, key_bits=4, value_bits=3, session_id="narrow")
            for cache in (wide, narrow):
                cache.append(keys, values)
            before = narrow.attend(queries)
    finally:
        assert first.stop() == 0, first.log()
    stored_before_the_version(db_path)
    second = ShardProcess(tmp_path, "--model", "none").start()
    try:
        with Client(second.target, retry=NO_RETRY) as c:
            with pytest.raises(grpc.RpcError) as caught:
                c.session("wide")[0].attend(queries)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
            assert "codebook version 1" in caught.value.details(), caught.value.details()
            assert np.array_equal(c.session("narrow")[0].attend(queries), before)
            assert len(c.session("wide")[0]) == 24  # the refused session is still there, unchanged
    finally:
        assert second.stop() == 0, second.log()
