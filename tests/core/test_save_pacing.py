"""Progress saves: every few seconds, less often where a save itself is slow."""

from napari_normcheck.core.run import save_pacing
from napari_normcheck.core.run.save_pacing import SavePacing


def test_saves_are_spaced_by_the_interval_or_by_their_own_cost(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(save_pacing.time, "perf_counter", lambda: now[0])
    pacing = SavePacing(interval=2.0, share=0.05)
    now[0] += 1.9
    assert not pacing.due()
    now[0] += 0.2
    assert pacing.due()
    pacing.saved()
    # A save of 20 MB of records: 0.3 s to snapshot, 0.4 s to write; at most 5% of the run.
    pacing.took("snapshot", 0.3)
    pacing.took("write", 0.4)
    now[0] += 13.9
    assert not pacing.due()
    now[0] += 0.2
    assert pacing.due()
    pacing.saved()
    pacing.took("write", 0.01)  # the latest cost of a part replaces the one before
    now[0] += 6.1
    assert not pacing.due()
    now[0] += 0.2
    assert pacing.due()


def test_a_timed_part_counts_as_its_cost_even_when_it_fails(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(save_pacing.time, "perf_counter", lambda: now[0])
    pacing = SavePacing(interval=2.0, share=0.05)

    def slow_write():
        now[0] += 0.5
        raise OSError("no space left on device")

    assert pacing.timed("snapshot", lambda: "records") == "records"
    try:
        pacing.timed("write", slow_write)
    except OSError:
        pass
    pacing.saved()
    now[0] += 9.9
    assert not pacing.due()  # 0.5 s of saving allows one save every 10 s
    now[0] += 0.2
    assert pacing.due()


def test_a_save_snapshots_now_and_writes_through_the_job_it_submits(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(save_pacing.time, "perf_counter", lambda: now[0])
    pacing = SavePacing(interval=2.0, share=0.05)
    queued, written = [], []

    def snapshot():
        now[0] += 0.1
        return {"tiles": 3}

    def write(taken):
        now[0] += 0.4
        written.append(taken)

    pacing.save(snapshot, write, queued.append)
    assert written == [] and len(queued) == 1  # the write waits for the writer thread
    queued[0]()
    assert written == [{"tiles": 3}]
    # 0.5 s of saving: the next save is due 10 s after the snapshot (taken at 0.1 s).
    now[0] = 10.0
    assert not pacing.due()
    now[0] = 10.2
    assert pacing.due()
