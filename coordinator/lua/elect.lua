-- elect.lua: keep or choose the leader, atomically (one compare-and-set: never two leaders, the
-- term only grows). Sticky: a live leader stays. Otherwise the live, eligible member first in the
-- electorate wins: highest priority, then oldest ULID. Every change increments the term (the
-- fencing token), announces cluster.leader on the system stream and records the event.
--
-- KEYS[1] members zset (id -> last heartbeat ms)   KEYS[2] electorate zset (id -> -priority)
-- KEYS[3] leader hash (id, term, since)            KEYS[4] system stream
-- KEYS[5] events stream                            KEYS[6] routing version
-- ARGV[1] member TTL in ms   ARGV[2] reason to record when the leader changes
-- Returns {"kept"|"elected"|"none", leader id or '', term}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local current = redis.call('HGET', KEYS[3], 'id') or ''
local term = tonumber(redis.call('HGET', KEYS[3], 'term') or '0')

local function live(id)
  local seen = redis.call('ZSCORE', KEYS[1], id)
  return seen and now - tonumber(seen) <= ttl
end

if current ~= '' and live(current) and redis.call('ZSCORE', KEYS[2], current) then
  return {'kept', current, term}
end

local chosen = ''
local offset = 0
while chosen == '' do
  local batch = redis.call('ZRANGE', KEYS[2], offset, offset + 99)
  if #batch == 0 then break end
  for _, id in ipairs(batch) do
    if live(id) then chosen = id break end
  end
  offset = offset + 100
end

if chosen == '' and current == '' then
  return {'none', '', term}
end
term = term + 1
redis.call('HSET', KEYS[3], 'id', chosen, 'term', term, 'since', now)
redis.call('INCR', KEYS[6])
local d = cjson.encode({leader_id = chosen, term = term, previous = current, reason = ARGV[2]})
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '100000', '*', 'k', 'pub', 't', 'cluster.leader', 'd', d,
  's', 'sidecar')
redis.call('XADD', KEYS[5], 'MAXLEN', '~', '10000', '*', 'event', 'leader', 'leader', chosen,
  'term', tostring(term), 'previous', current, 'reason', ARGV[2])
if chosen == '' then
  return {'none', '', term}
end
return {'elected', chosen, term}
