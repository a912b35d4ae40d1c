"""How replicas share the cores (loadtest/launch/replicas.py), without starting any."""

from __future__ import annotations

from loadtest.launch.replicas import replica_env


def test_replicas_share_the_cores_unless_told(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert [replica_env(n, None) for n in (1, 2, 3, 16)] == [{"OMP_NUM_THREADS": t} for t in ("8", "4", "2", "1")]
    assert replica_env(2, 3) == {"OMP_NUM_THREADS": "3"}
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert replica_env(2, None) == {}  # the caller's setting reaches the replicas as it is
