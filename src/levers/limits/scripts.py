"""The Lua scripts behind shared limits (levers/limits/shared.py), one per decision, each reading the
server's clock so that the clocks of the hosts never matter, and their registration per client.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import redis.asyncio
from redis.commands.core import AsyncScript

# The server's clock in ms, shared by the scripts below.
NOW = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

# KEYS: window. ARGV: limit, window ms, member, in-flight hold ms, longest wait ms. Returns 0 when
# admitted, else ms to wait (at most the longest wait: calls in flight may end at any time).
RATE = f"""{NOW}
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window + tonumber(ARGV[4]))
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.min(tonumber(ARGV[5]), math.max(1, tonumber(oldest[2]) + window - now))
"""

# KEYS: window, leases, totals. ARGV: member, window ms + hold ms, started (1 if the call was
# made), rate limited (1 or 0). Ends a call: its window entry is stamped with the end time (or
# dropped if the call never started), its lease dropped, and it is counted.
FINISH = f"""{NOW}
if ARGV[3] == '1' then
  if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    redis.call('ZADD', KEYS[1], now, ARGV[1])
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  end
  redis.call('HINCRBY', KEYS[3], 'calls', 1)
  if ARGV[4] == '1' then
    redis.call('HINCRBY', KEYS[3], 'rate_limited', 1)
  end
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 0
"""

# KEYS: leases, totals. ARGV: cap (0 for none), ttl ms, lease id. Returns 0 when taken, else the
# ms until the first lease expires. The peak is kept here, where the count is exact.
ACQUIRE = f"""{NOW}
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local cap = tonumber(ARGV[1])
if cap == 0 or held < cap then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  if held + 1 > tonumber(redis.call('HGET', KEYS[2], 'peak_in_flight') or '0') then
    redis.call('HSET', KEYS[2], 'peak_in_flight', held + 1)
  end
  return 0
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(first[2]) - now)
"""

# KEYS: leases, window. ARGV: ttl ms, lease id, window ms + ttl ms. Returns 1 when renewed, 0
# when the lease had expired: an expired lease may already be counted free by someone else, so it
# is dropped, never revived. A call's window entry is held as long as its lease.
RENEW = f"""{NOW}
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[2])
if expiry and tonumber(expiry) > now then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
  if redis.call('ZADD', KEYS[2], 'XX', 'CH', now + tonumber(ARGV[1]), ARGV[2]) == 1 then
    redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
  end
  return 1
end
redis.call('ZREM', KEYS[1], ARGV[2])
return 0
"""


@dataclass(frozen=True)
class Scripts:
    rate: AsyncScript
    acquire: AsyncScript
    renew: AsyncScript
    finish: AsyncScript


# Registered once per client; weak, so a job's client and its scripts go together.
_scripts: weakref.WeakKeyDictionary[redis.asyncio.Redis, Scripts] = weakref.WeakKeyDictionary()


def scripts_for(client: redis.asyncio.Redis) -> Scripts:
    if client not in _scripts:
        _scripts[client] = Scripts(
            *(client.register_script(script) for script in (RATE, ACQUIRE, RENEW, FINISH))
        )
    return _scripts[client]
