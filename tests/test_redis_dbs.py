"""The table of the shared Redis's dbs (tests/redis_dbs.py) gives each module its own db, never db 0."""

from __future__ import annotations

import redis_dbs


def test_each_module_has_its_own_db_and_db_0_is_left_to_people():
    dbs = list(redis_dbs.ALL.values())
    assert len(redis_dbs.ALL) >= 13 and len(set(dbs)) == len(dbs), redis_dbs.ALL
    assert all(1 <= db <= 15 for db in dbs), redis_dbs.ALL  # redis-server's default 16 dbs; 0 is the product's
