"""Taking the next job from a phase's priority lanes in one atomic step.

RQ takes from one queue by moving the job to the queue's holding list (LMOVE), so a worker killed
at any instant leaves the job in one of the two lists, and the supervisor puts back what sits in a
holding list unregistered. From several queues RQ pops instead (BLPOP), and a worker killed
between the pop and the registration loses the job. Here one Lua script looks at every lane,
picks one and moves its head job to that lane's holding list: Redis runs a script as one step,
so the job is always in a lane or in a holding list, never in between. A worker of a phase that
batches (``batch:``) takes up to its batch size in the same script, each job picked as if taken
alone.

The script takes the highest lane with jobs, except that a lower lane with jobs gets at least
``min_share`` of the dequeues: each time it is passed over it gains ``min_share`` credit, and once
its credit reaches ``1 - min_share`` it is taken from and pays that back, so it gets one dequeue
in every ``1 / min_share``. A lane that empties loses its credit: there is no saving up.

A script cannot block. An idle worker blocks on the phase's wake list instead, which every push
onto a lane sets (levers.documents.lanes) and the script clears once the lanes are empty; the
worker rotates its one item in place (BLMOVE from the list to itself), so every idle worker wakes
and none consumes it. A job pushed by a client that sets no wake (RQ's own `rq requeue`) is found
at the next look, within LANE_LOOK_S.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis
from redis.commands.core import Script
from rq import Queue
from rq.exceptions import DequeueTimeout

from levers import keys

# An idle worker looks at its lanes at least this often, woken or not.
LANE_LOOK_S = 1.0

# KEYS: the lanes' queues, highest first; their holding lists, in the same order; the lanes' state
# hash; the wake list. ARGV: min_share, how many jobs to take, then each lane's name. Returns
# {queue key, job id, 1 if taken for a lower lane's share (else 0)} per job taken, in order, or
# false (the wake list cleared) when every lane is empty. Each job is picked as if taken alone.
_TAKE = """
local n = (#KEYS - 2) / 2
local state, wake = KEYS[2 * n + 1], KEYS[2 * n + 2]
local share = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
local due = 1 - share
local sizes, total, taken = {}, 0, {}
for i = 1, n do
  sizes[i] = redis.call('LLEN', KEYS[i])
  total = total + sizes[i]
end
for _ = 1, count do
  local top = nil
  for i = 1, n do
    if top == nil and sizes[i] > 0 then top = i end
  end
  if top == nil then break end
  local pick, best, credits = top, -1, {}
  for i = top + 1, n do
    local field = 'credit:' .. ARGV[i + 2]
    if sizes[i] == 0 or share <= 0 then
      redis.call('HDEL', state, field)
    else
      credits[i] = tonumber(redis.call('HGET', state, field)) or 0
      if credits[i] >= due - 1e-9 and credits[i] > best then pick, best = i, credits[i] end
    end
  end
  for i, credit in pairs(credits) do
    if i == pick then credit = credit - due else credit = credit + share end
    redis.call('HSET', state, 'credit:' .. ARGV[i + 2], tostring(credit))
  end
  local id = redis.call('LPOP', KEYS[pick])
  redis.call('RPUSH', KEYS[n + pick], id)
  redis.call('HINCRBY', state, 'taken:' .. ARGV[pick + 2], 1)
  sizes[pick], total = sizes[pick] - 1, total - 1
  taken[#taken + 1] = KEYS[pick]
  taken[#taken + 1] = id
  taken[#taken + 1] = (pick == top) and 0 or 1
end
if total == 0 then redis.call('DEL', wake) end
if #taken == 0 then return false end
return taken
"""

_scripts: weakref.WeakKeyDictionary[redis.Redis, Script] = weakref.WeakKeyDictionary()


def _script(connection: redis.Redis) -> Script:
    if connection not in _scripts:
        _scripts[connection] = connection.register_script(_TAKE)
    return _scripts[connection]


@dataclass(frozen=True)
class Lanes:
    """One phase's lanes a worker serves, highest first."""

    base: str  # the phase's plain queue name (its normal lane)
    queues: tuple[Queue, ...]
    lanes: tuple[str, ...]


def group(queues: Sequence[Queue]) -> list[Lanes]:
    """The queues a worker serves, as phases' lanes: in the order each phase first appears, each
    phase's lanes highest first."""
    found: dict[str, list[Queue]] = {}
    for queue in queues:
        found.setdefault(keys.lane_of(queue.name)[0], []).append(queue)
    grouped = []
    for base, members in found.items():
        ordered = sorted(members, key=lambda q: keys.LANES.index(keys.lane_of(q.name)[1]))
        grouped.append(Lanes(base, tuple(ordered), tuple(keys.lane_of(q.name)[1] for q in ordered)))
    return grouped


@dataclass(frozen=True)
class Took:
    """A job moved to its lane's holding list: ``for_share`` when a higher lane had jobs (the
    lower lane's minimum share chose it)."""

    queue: Queue
    job_id: str
    for_share: bool = False


def take(connection: redis.Redis, lanes: Lanes, min_share: float) -> Took | None:
    """Move the next job of ``lanes`` to its lane's holding list, atomically."""
    found = take_many(connection, lanes, min_share, 1)
    return found[0] if found else None


def take_many(connection: redis.Redis, lanes: Lanes, min_share: float, count: int) -> list[Took]:
    """Move up to ``count`` next jobs of ``lanes`` to their lanes' holding lists, in one atomic
    step: a worker killed at any instant leaves each of them in a lane or a holding list."""
    found = _script(connection)(
        keys=[*(q.key for q in lanes.queues), *(q.intermediate_queue_key for q in lanes.queues),
              keys.lane_state(lanes.base), keys.lane_wake(lanes.base)],
        args=[repr(float(min_share)), str(max(1, int(count))), *lanes.lanes],
    )  # fmt: skip
    if not found:
        return []
    by_key = {q.key: q for q in lanes.queues}
    took = []
    for at in range(0, len(found), 3):
        queue_key, job_id = (v.decode() if isinstance(v, bytes) else str(v) for v in found[at : at + 2])
        took.append(Took(by_key[queue_key], job_id, bool(int(found[at + 2]))))
    return took


def take_any(
    connection: redis.Redis, served: Sequence[Lanes], min_share: float, timeout: float | None
) -> Took:
    """The next job of the first phase in ``served`` that has one (see ``take_some``)."""
    return take_some(connection, served, min_share, timeout)[0]


def take_some(
    connection: redis.Redis, served: Sequence[Lanes], min_share: float, timeout: float | None,
    counts: Mapping[str, int] | None = None,
) -> list[Took]:  # fmt: skip
    """The next jobs of the first phase in ``served`` that has any: up to ``counts`` of its base
    queue's name (1 when not given), at least one. ``timeout``: None looks once (DequeueTimeout
    when there is none), else waits up to that long for one, blocking on the first phase's wake
    list between looks."""
    deadline = time.monotonic() + (timeout or 0.0)
    while True:
        for lanes in served:
            found = take_many(connection, lanes, min_share, (counts or {}).get(lanes.base, 1))
            if found:
                return found
        left = deadline - time.monotonic()
        if timeout is None or left <= 0:
            raise DequeueTimeout(timeout, [q.key for lanes in served for q in lanes.queues])
        wake = keys.lane_wake(served[0].base)
        # rotated in place: the item stays for the other idle workers and for the next look
        # never 0 (BLMOVE's "block for good"), which a wait a batch fills with could round to
        block = max(round(min(left, LANE_LOOK_S), 3), 0.001)
        connection.execute_command("BLMOVE", wake, wake, "LEFT", "LEFT", block)
