"""One side of the lease races in tests/test_ownership.py, run as its own process (two
processes on one host are two writers; two threads of one process are not).

    python tests/lease_race.py URI RACES START INTERVAL DONE_DIR

For race i it waits until START + i * INTERVAL (wall clock, shared by both sides), then
tries to take the lease of URI/race-i, and keeps what it won until both sides have tried
every race (each marks that in DONE_DIR): a side that ran late must not find the other's
leases already released. Prints one JSON line: the race numbers this side won.
"""
import json
import os
import sys
import time

from hrnet import storage


def main(uri: str, races: int, start: float, interval: float, done_dir: str) -> None:
    won, held = [], []
    for i in range(races):
        time.sleep(max(0.0, start + i * interval - time.time()))
        lease = storage.Lease(f"{uri}/race-{i}")
        try:
            lease.__enter__()
        except storage.LeaseHeldError:
            continue
        won.append(i)
        held.append(lease)
    with open(os.path.join(done_dir, str(os.getpid())), "w"):
        pass
    deadline = time.time() + 120
    while len(os.listdir(done_dir)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    for lease in held:
        lease.__exit__(None, None, None)
    print(json.dumps(won))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
