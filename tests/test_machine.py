"""ophsd.runtime.machine: CPU busy accounting from /proc/stat and the shared-CPU warning."""
import pytest

from ophsd.runtime import machine


def test_busy_cpus_counts_non_idle_time_in_cpus():
    # 2 CPUs; over the interval 300 jiffies passed of which 150 idle/iowait -> 1 CPU busy
    assert machine.busy_cpus((100, 1000), (250, 1300), 2) == pytest.approx(1.0)
    assert machine.busy_cpus((100, 1000), (100, 1000), 2) == 0.0  # no time passed


def test_cpu_times_reads_the_aggregate_line(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  10 2 5 80 3 0 0 0 7 0\ncpu0 5 1 2 40 1 0 0 0 3 0\n")
    busy, total = machine._cpu_times(str(stat))
    assert (busy, total) == (17, 100)  # guest time is already inside user
    stat.write_text("garbage\n")
    assert machine._cpu_times(str(stat)) is None
    assert machine._cpu_times(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("busy_jiffies, threads, warned", [
    (150, 2, True),    # 1.0 of 2 CPUs busy elsewhere: 2 threads do not fit
    (20, 2, False),    # 0.13 busy: they fit
    (150, 1, False),   # one thread never waits on a sibling
])
def test_contention_warning(monkeypatch, busy_jiffies, threads, warned):
    readings = iter([(0, 0), (busy_jiffies, 300)])
    monkeypatch.setattr(machine, "_cpu_times", lambda path="/proc/stat": next(readings))
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    msg = machine.cpu_contention_warning(threads, interval=0.0)
    assert (msg is not None) == warned
    if warned:
        assert "1.0 of this machine's 2 CPUs" in msg and "OMP_NUM_THREADS=1" in msg


def test_no_warning_where_proc_stat_is_unreadable(monkeypatch):
    monkeypatch.setattr(machine, "_cpu_times", lambda path="/proc/stat": None)
    assert machine.cpu_contention_warning(4, interval=0.0) is None


def test_cpu_isa_names_only_known_flags():
    assert set(machine.cpu_isa()) <= set(machine._ISA_FLAGS)
