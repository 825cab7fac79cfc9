"""The Lua scripts behind shared limits (levers/limits/shared.py), one per decision, each reading the
server's clock so that the clocks of the hosts never matter, and their registration per client.

What a limit learns of its provider (levers/limits/adaptive.py) lives in one hash per limit. Every
figure read from it is bounded here, on the server, before it is used: a value that is missing,
not a number or out of bounds counts as not learned, so a hostile or corrupt hash can lower a
limit to no less than one call, never raise it above the declared figures or stop it for longer
than ``MAX_PAUSE_S``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import redis.asyncio
from redis.commands.core import AsyncScript

from levers.limits.adaptive import (
    CUT_FACTOR,
    MAX_PAUSE_S,
    MAX_PROVIDER_RATE,
    MAX_QUIET_WINDOWS,
    RAISE_SHARE,
    REFUSALS_KEPT,
    STATE_TTL_S,
)

# The server's clock in ms, shared by the scripts below.
NOW = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

# Reading the learned state, bounded. `declared` 0 means the figure is not declared.
STATE = f"""
local function bounded(value, low, high, default)
  value = tonumber(value)
  if value == nil or not (value >= low and value <= high) then return default end
  return value
end
-- ms left of a pause every caller honours; a pause further ahead than the longest is not ours
local function paused(until_ms, now)
  local left = bounded(until_ms, now, now + {MAX_PAUSE_S * 1000}, now) - now
  return left
end
-- the provider's own figure, when its headers told it, else the one learned from refusals
local function stated(provider)
  return bounded(provider, 0, {MAX_PROVIDER_RATE}, nil)
end
local function effective_rate(declared, learned, provider)
  provider = stated(provider)
  if provider then return math.min(declared, math.max(1, provider)) end
  return bounded(learned, 1, declared, declared)
end
local function effective_concurrency(declared, learned)
  return bounded(learned, 1, declared, declared)
end
local function mark(key, field, now)
  redis.call('HSET', key, field, now)
  redis.call('PEXPIRE', key, {STATE_TTL_S * 1000})
end
"""

# KEYS: window, adaptive. ARGV: declared rate, window ms, member, in-flight hold ms, longest wait
# ms. Returns {0, generation, 0} when admitted, else {ms to wait, 0, paused (1 when the wait is a
# pause, exact; else at most the longest wait: calls in flight may end at any time)}. A learned
# rate that holds a call back is marked as binding: only a binding figure is raised.
RATE = f"""{NOW}{STATE}
local s = redis.call('HMGET', KEYS[2], 'rate', 'provider_rate', 'paused_until', 'generation')
local pause = paused(s[3], now)
if pause > 0 then return {{pause, 0, 1}} end
local declared = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = math.floor(effective_rate(declared, s[1], s[2]))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window + tonumber(ARGV[4]))
  return {{0, math.floor(bounded(s[4], 0, 2^52, 0)), 0}}
end
if limit < declared then mark(KEYS[2], 'rate_bound_at', now) end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {{math.min(tonumber(ARGV[5]), math.max(1, tonumber(oldest[2]) + window - now)), 0, 0}}
"""

# KEYS: leases, totals, adaptive, window. ARGV: declared cap (0 for none), ttl ms, lease id, 1 when
# a rate is declared. Returns {0, generation, 0} when taken, else {ms to wait, 0, paused} (the ms
# until the first lease expires, or the pause). The peak is kept here, where it is exact. A learned
# concurrency is marked as binding when a call waits while every slot holds a call that started:
# calls waiting for their rate window hold slots too, and a raise would not help them.
ACQUIRE = f"""{NOW}{STATE}
local s = redis.call('HMGET', KEYS[3], 'concurrency', 'paused_until', 'generation')
local pause = paused(s[2], now)
if pause > 0 then return {{pause, 0, 1}} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local cap = tonumber(ARGV[1])
if cap > 0 then cap = math.floor(effective_concurrency(cap, s[1])) end
if cap == 0 or held < cap then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  if held + 1 > tonumber(redis.call('HGET', KEYS[2], 'peak_in_flight') or '0') then
    redis.call('HSET', KEYS[2], 'peak_in_flight', held + 1)
  end
  return {{0, math.floor(bounded(s[3], 0, 2^52, 0)), 0}}
end
-- with a rate, the calls started and not ended are the window's entries stamped ahead of now
local started = held
if ARGV[4] == '1' then started = redis.call('ZCOUNT', KEYS[4], '(' .. now, '+inf') end
if started >= cap and cap < tonumber(ARGV[1]) then mark(KEYS[3], 'concurrency_bound_at', now) end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {{math.max(1, tonumber(first[2]) - now), 0, 0}}
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

# The adaptation when a call ends, shared by FINISH. A refusal cuts the figures once per
# generation: the calls admitted before a cut and refused after it were sent at the old figures,
# and do not cut the rate again. Each of them takes one slot away from the concurrency the round
# was sent at: the provider refused that many of the calls it was sent at once. A cut after a raise
# doubles the quiet period before the next raise; a raise after a raise halves it. `a` is the
# adaptive key, `d` the declared figures and the quiet base.
ADAPT = f"""
local function cut(a, d, generation, now)
  local s = redis.call('HMGET', a, 'generation', 'rate', 'concurrency', 'provider_rate', 'raised', 'quiet',
    'cut_from', 'cut_refused')
  local current = math.floor(bounded(s[1], 0, 2^52, 0))
  local c = effective_concurrency(d.concurrency, s[3])
  if generation == current - 1 and d.concurrency > 0 then
    local refused = math.floor(bounded(s[8], 1, 2^31, 1)) + 1
    local from = bounded(s[7], 1, d.concurrency, d.concurrency)
    redis.call('HSET', a, 'cut_refused', refused, 'concurrency', math.max(1, math.min(c, from - refused)))
    return
  end
  if generation ~= current then return end
  if d.concurrency > 0 then
    redis.call('HSET', a, 'concurrency', math.max(1, c * {CUT_FACTOR}), 'cut_from', math.floor(c),
      'cut_refused', 1)
  end
  -- a rate the provider states is followed, not guessed: only concurrency is cut then
  if d.rate > 0 and not stated(s[4]) then
    redis.call('HSET', a, 'rate', math.max(1, effective_rate(d.rate, s[2], nil) * {CUT_FACTOR}))
  end
  local quiet = bounded(s[6], d.quiet, d.quiet * {MAX_QUIET_WINDOWS}, d.quiet)
  if s[5] == '1' then quiet = math.min(quiet * 2, d.quiet * {MAX_QUIET_WINDOWS}) end
  redis.call('HSET', a, 'generation', current + 1, 'changed_at', now, 'raised', 0, 'quiet', quiet)
end
local function raise(a, d, now)
  local s = redis.call('HMGET', a, 'changed_at', 'quiet', 'rate', 'concurrency', 'provider_rate',
    'rate_bound_at', 'concurrency_bound_at', 'raised')
  local changed = bounded(s[1], 0, now, 0)
  local quiet = bounded(s[2], d.quiet, d.quiet * {MAX_QUIET_WINDOWS}, d.quiet)
  if now - changed < quiet then return end
  local raised = false
  local c = effective_concurrency(d.concurrency, s[4])
  if d.concurrency > 0 and c < d.concurrency and bounded(s[7], 0, now, 0) > changed then
    local step = math.max(1, d.concurrency * {RAISE_SHARE})
    redis.call('HSET', a, 'concurrency', math.min(d.concurrency, c + step))
    raised = true
  end
  local r = effective_rate(d.rate, s[3], nil)
  if d.rate > 0 and not stated(s[5]) and r < d.rate and bounded(s[6], 0, now, 0) > changed then
    redis.call('HSET', a, 'rate', math.min(d.rate, r + math.max(1, d.rate * {RAISE_SHARE})))
    raised = true
  end
  if not raised then return end
  if s[8] == '1' then quiet = math.max(d.quiet, quiet / 2) end
  redis.call('HSET', a, 'changed_at', now, 'raised', 1, 'quiet', quiet)
end
"""

# KEYS: window, leases, totals, adaptive, refusals. ARGV: member, window ms + hold ms, started (1
# if the call was made), rate limited (1 or 0), the call's generation, pause ms (-1 for none: the
# retry-after of a refusal, or until the provider has a request again), the provider's rate per
# window (-1 when it did not say), declared rate, declared concurrency (0 for none), quiet ms (the
# base period without a refusal before a raise). Ends a call: its window entry is stamped with the
# end time (or dropped if the call never started), its lease dropped, it is counted, and the limit
# learns from its outcome.
FINISH = f"""{NOW}{STATE}{ADAPT}
if ARGV[3] == '1' then
  if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    redis.call('ZADD', KEYS[1], now, ARGV[1])
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  end
  redis.call('HINCRBY', KEYS[3], 'calls', 1)
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[3] ~= '1' then return 0 end
local d = {{rate = tonumber(ARGV[8]), concurrency = tonumber(ARGV[9]), quiet = tonumber(ARGV[10])}}
local provider = tonumber(ARGV[7])
if provider >= 0 then redis.call('HSET', KEYS[4], 'provider_rate', provider) end
local pause = math.min(tonumber(ARGV[6]), {MAX_PAUSE_S * 1000})
if pause > paused(redis.call('HGET', KEYS[4], 'paused_until'), now) then
  redis.call('HSET', KEYS[4], 'paused_until', now + pause)
end
if ARGV[4] == '1' then
  redis.call('HINCRBY', KEYS[3], 'rate_limited', 1)
  redis.call('ZADD', KEYS[5], now, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - 60000)
  redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -{REFUSALS_KEPT + 1})
  redis.call('PEXPIRE', KEYS[5], 60000)
  cut(KEYS[4], d, tonumber(ARGV[5]), now)
else
  raise(KEYS[4], d, now)
end
redis.call('PEXPIRE', KEYS[4], {STATE_TTL_S * 1000})
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
