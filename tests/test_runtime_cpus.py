"""usable_cpus: a pod's CPU limit, not the node's core count."""
import builtins
import io

from hrnet.runtime import usable_cpus


def _fake_files(monkeypatch, files):
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if path in files:
            if files[path] is None:
                raise FileNotFoundError(path)
            return io.StringIO(files[path])
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


def test_cgroup_v2_quota_caps_the_affinity(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    _fake_files(monkeypatch, {"/sys/fs/cgroup/cpu.max": "1500000 100000\n"})
    assert usable_cpus() == 15


def test_cgroup_v1_quota_and_no_limit(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    _fake_files(monkeypatch, {"/sys/fs/cgroup/cpu.max": None, "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "250000",
                              "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"})
    assert usable_cpus() == 3
    _fake_files(monkeypatch, {"/sys/fs/cgroup/cpu.max": "max 100000\n"})
    assert usable_cpus() == 8
